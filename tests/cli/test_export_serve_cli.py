"""`rlft export` and `rlft serve` as commands: routed, documented, and refusing flags that do not apply."""

from __future__ import annotations

import gguf
import pytest

from rlft.cli import main


def test_router_lists_export_and_serve(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert "export" in out and "serve" in out
    for command, flag in (("export", "--quant"), ("serve", "--batch_window_ms")):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert flag in capsys.readouterr().out


def test_export_gguf_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "tiny.q8_0.gguf"
    main(["export", "tiny-qwen3", "--to", "gguf", "--quant", "q8_0", "--out", str(out)])
    assert f"-> {out} (gguf)" in capsys.readouterr().out
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert reader.fields["general.architecture"].contents() == "qwen3"


def test_export_refuses_quant_for_folders_and_unknown_formats(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RLFT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "tiny-llama", "--to", "merged", "--quant", "q8_0", "--out", str(tmp_path / "m")])
    assert exit_info.value.code == 1
    assert "rlft export: error: --quant is for --to gguf" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "tiny-llama", "--to", "tflite", "--out", str(tmp_path / "t")])
    assert not (tmp_path / "m").exists()
