"""The demo's synthetic world as a place of its own beside the framework: what its images show in
words (``describe``) and the stages that pre-train its small stand-ins for the paper's pretrained
components (``stages``, run by ``python -m mige_lightning pretrain-world``)."""
