from mige_cli.main import main

if __name__ == "__main__":
    main()
