"""Output-folder safety (hf_compress.utils.output), shared by every writer of the library."""

import pytest

from hf_compress.utils.output import check_output_dir, clear_library_files, library_files, prepare_output_dir


def test_refuses_a_file_and_a_non_empty_folder_without_touching_them(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileExistsError, match=r"output_dir=.*a_file.*existing file"):
        check_output_dir(tmp_path / "a_file", overwrite=True)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"save_to=.*mine.*not empty \(1 entries: notes.txt\).*overwrite=True"):
        prepare_output_dir(folder, overwrite=False, argument="save_to")
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    with pytest.raises(TypeError, match="overwrite='yes'"):
        check_output_dir(folder, overwrite="yes")
    # absent and empty folders are fine
    assert prepare_output_dir(tmp_path / "new" / "deep", overwrite=False).is_dir()
    assert check_output_dir(tmp_path / "new" / "deep", overwrite=False) == tmp_path / "new" / "deep"


def test_overwrite_removes_only_library_files(tmp_path):
    ours = ["config.json", "model-00001-of-00003.safetensors", "tokenizer.json", "adapter_config.json", "report.md"]
    theirs = ["notes.txt", "README.md", "model.safetensors.bak", "results.json"]
    for name in ours + theirs:
        (tmp_path / name).write_text(name)
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / "model.safetensors").write_text("x")
    assert [p.name for p in library_files(tmp_path)] == sorted(ours)
    prepare_output_dir(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(theirs + ["checkpoint-10"])
    # Trainer checkpoints only go when the caller says it ran the Trainer there
    assert [p.name for p in clear_library_files(tmp_path, ("checkpoint-*",))] == ["checkpoint-10"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(theirs)


def test_quantize_model_refuses_then_keeps_user_files_on_overwrite(tmp_path):
    pytest.importorskip("bitsandbytes")
    from tiny_models import tiny_bert

    from hf_compress import quantize_model

    folder = tmp_path / "q"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "model-00002-of-00002.safetensors").write_text("stale")
    with pytest.raises(FileExistsError, match="not empty"):
        quantize_model(tiny_bert(hidden=64), "nf4", output_dir=folder)
    assert sorted(p.name for p in folder.iterdir()) == ["model-00002-of-00002.safetensors", "notes.txt"]
    quantize_model(tiny_bert(hidden=64), "nf4", output_dir=folder, overwrite=True)
    names = {p.name for p in folder.iterdir()}
    assert "notes.txt" in names and "model.safetensors" in names and "model-00002-of-00002.safetensors" not in names
