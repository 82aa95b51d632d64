import pytest

from mige_lightning.prompt import (
    TASK_PREFIX,
    Task,
    build_prompt,
    count_placeholders,
    normalize_instruction,
    split_placeholders,
)


def test_blip_normalisation_lowercases_strips_and_collapses():
    assert normalize_instruction('Put the "Dog" (big!) here:  now.') == "put the dog big here now"


def test_normalisation_truncates_to_max_words():
    assert normalize_instruction(" ".join(["w"] * 100), max_words=88).count("w") == 88


def test_placeholders_are_case_insensitive_and_keep_order():
    text = "replace the skirt in <ImageHere> with <imagehere>!"
    assert count_placeholders(text) == 2
    assert split_placeholders(text) == ["replace the skirt in ", " with ", "!"]


def test_build_prompt_prefixes_each_task():
    for task in Task:
        prompt = build_prompt(task, "Make <ImageHere> Blue.")
        assert prompt == TASK_PREFIX[task] + "make <imagehere> blue"
    assert build_prompt("edit", "x") == build_prompt(Task.EDIT, "x")


def test_unknown_task_names_the_choices():
    with pytest.raises(ValueError, match="unknown task 'paint'.*subject_edit"):
        build_prompt("paint", "x")


def test_authors_inference_prompts_reword_and_normalise_the_prefix_for_subject_and_subject_edit():
    from mige_lightning.prompt import build_prompt

    text = "A dog <imagehere> on the beach."
    assert build_prompt("subject", text, style="authors_inference") == (
        "follow the text instruction to generate an image with the given objects' images, "
        "preserving the subject's identity a dog <imagehere> on the beach"
    )
    assert build_prompt("subject_edit", text, style="authors_inference") == (
        "subject-driven editing a dog <imagehere> on the beach"
    )
    # the authors' edit inference uses the training prompt
    assert build_prompt("edit", text, style="authors_inference") == build_prompt("edit", text)
    assert build_prompt("subject", text).startswith("Follow the text instruction")
    with pytest.raises(ValueError, match="unknown prompt style"):
        build_prompt("edit", text, style="theirs")
