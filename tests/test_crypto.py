"""Encryption at rest: the envelope round-trips and refuses wrong keys and tampering, readers open encrypted
data in memory, and a run on encrypted data writes no plaintext of it anywhere."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from lmtailor import crypto
from lmtailor.cli import main
from lmtailor.errors import EncryptionError

MARKER = "ZQX-planted-7f3a9c-marker"


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> crypto.Key:
    """A fresh key, also in $LMTAILOR_DATA_KEY (the default source of readers and the CLI)."""
    text = crypto.new_key_text()
    monkeypatch.setenv(crypto.DEFAULT_KEY_ENV, text)
    return crypto.parse_key(text.encode(), "test key")


def _other_key() -> crypto.Key:
    return crypto.parse_key(crypto.new_key_text().encode(), "other key")


# ---- the envelope --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 1000, crypto.CHUNK, crypto.CHUNK + 1, 3 * crypto.CHUNK + 17])
def test_round_trip_small_and_multi_chunk(tmp_path: Path, key: crypto.Key, size: int) -> None:
    data = os.urandom(size)
    (tmp_path / "a.bin").write_bytes(data)
    crypto.encrypt_file(tmp_path / "a.bin", tmp_path / "a.bin.enc", key)
    sealed = (tmp_path / "a.bin.enc").read_bytes()
    chunks = max(1, -(-size // crypto.CHUNK))
    assert len(sealed) == crypto.HEADER.size + size + chunks * crypto.TAG
    assert crypto.is_encrypted(tmp_path / "a.bin.enc") and not crypto.is_encrypted(tmp_path / "a.bin")
    assert crypto.read_bytes(tmp_path / "a.bin.enc", key) == data
    crypto.decrypt_file(tmp_path / "a.bin.enc", tmp_path / "b.bin", key)
    assert (tmp_path / "b.bin").read_bytes() == data


def test_passphrase_key_file_and_env_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.txt").write_text("hello")
    monkeypatch.setenv("PASS", "correct horse battery staple")
    by_pass = crypto.KeySource(key_env=None, passphrase_env="PASS")
    crypto.encrypt_file(tmp_path / "a.txt", tmp_path / "p.enc", by_pass, scrypt_log_n=10)
    assert crypto.read_bytes(tmp_path / "p.enc", by_pass) == b"hello"
    monkeypatch.setenv("PASS", "wrong horse")
    with pytest.raises(EncryptionError, match="wrong key"):
        crypto.read_bytes(tmp_path / "p.enc", by_pass)

    assert "0600" in crypto.keygen(tmp_path / "k")
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    with pytest.raises(EncryptionError, match="already exists"):
        crypto.keygen(tmp_path / "k")
    by_file = crypto.KeySource(key_env=None, key_file=str(tmp_path / "k"))
    crypto.encrypt_file(tmp_path / "a.txt", tmp_path / "f.enc", by_file)
    # the same key as hex in a variable opens it: base64 and hex are two spellings of one key
    monkeypatch.setenv("HEXKEY", by_file.load().secret.hex())
    assert crypto.read_bytes(tmp_path / "f.enc", crypto.KeySource(key_env="HEXKEY")) == b"hello"
    with pytest.raises(EncryptionError, match="was encrypted with a 32-byte key"):
        crypto.read_bytes(tmp_path / "f.enc", by_pass)
    for bad in ("too short", "0123456789abcdef0123456789abcdef", "a 32-character password, not key"):
        monkeypatch.setenv("BAD", bad)  # the second is a 128-bit hex key: not silently 32 ASCII key bytes
        with pytest.raises(EncryptionError, match=r"\$BAD is not a 32-byte key"):
            crypto.KeySource(key_env="BAD").load()
    (tmp_path / "raw.key").write_bytes(b"\xff" + os.urandom(31))
    assert len(crypto.KeySource(key_env=None, key_file=str(tmp_path / "raw.key")).load().secret) == 32
    with pytest.raises(EncryptionError, match=r"no key: \$UNSET_VAR is not set"):
        crypto.KeySource(key_env="UNSET_VAR").load()


def _sealed(tmp_path: Path, key: crypto.Key, size: int = 3 * crypto.CHUNK + 100) -> tuple[Path, bytearray]:
    (tmp_path / "a.bin").write_bytes(os.urandom(size))
    crypto.encrypt_file(tmp_path / "a.bin", tmp_path / "a.enc", key)
    return tmp_path / "a.enc", bytearray((tmp_path / "a.enc").read_bytes())


def _damaged(tmp_path: Path, key: crypto.Key) -> list[tuple[str, bytes]]:
    """(what, bytes) of damaged copies of one sealed file: flipped bits, cuts, swapped and dropped chunks."""
    _, raw = _sealed(tmp_path, key)
    h, c = crypto.HEADER.size, crypto.CHUNK + crypto.TAG
    cases = []
    for pos in (6, 12, 20, 40, 50, h, h + 5, h + c + 7, len(raw) - 1):
        flipped = bytearray(raw)
        flipped[pos] ^= 0x01
        cases.append((f"bit at {pos}", bytes(flipped)))
    cases += [("cut at a chunk boundary", bytes(raw[:h + c])), ("cut mid chunk", bytes(raw[:-5])),
              ("header only", bytes(raw[:h])), ("half a header", bytes(raw[:30])),
              ("chunks swapped", bytes(raw[:h] + raw[h + c:h + 2 * c] + raw[h:h + c] + raw[h + 2 * c:])),
              ("chunk dropped", bytes(raw[:h] + raw[h + c:])), ("bytes appended", bytes(raw + b"x" * 20)),
              ("version", bytes(raw[:6] + struct.pack("B", 9) + raw[7:]))]
    return cases


def test_wrong_key_and_every_kind_of_damage_raise_and_write_nothing(tmp_path: Path, key: crypto.Key) -> None:
    src, _ = _sealed(tmp_path, key)
    out = tmp_path / "out.bin"
    with pytest.raises(EncryptionError, match="wrong key") as err:
        crypto.decrypt_file(src, out, _other_key())
    assert "\n" not in str(err.value)
    for what, blob in _damaged(tmp_path, key):
        bad = tmp_path / "bad.enc"
        bad.write_bytes(blob)
        with pytest.raises(EncryptionError) as err:
            crypto.decrypt_file(bad, out, key)
        assert "\n" not in str(err.value), what
        with pytest.raises(EncryptionError):
            crypto.read_bytes(bad, key)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "a.enc", "bad.enc"]  # no temp file left


def test_cli_encrypt_decrypt_keygen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["privacy", "keygen", "--out", str(tmp_path / "k")]) == 0
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": MARKER}) + "\n")
    kf = ["--key-file", str(tmp_path / "k")]
    assert main(["privacy", "encrypt", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "d.jsonl.enc"), *kf]) == 0
    assert MARKER.encode() not in (tmp_path / "d.jsonl.enc").read_bytes()
    assert main(["privacy", "decrypt", str(tmp_path / "d.jsonl.enc"), "--out", str(tmp_path / "back.jsonl"),
                 *kf]) == 0
    assert (tmp_path / "back.jsonl").read_text() == (tmp_path / "d.jsonl").read_text()
    # a wrong key: one line, exit 2, nothing written
    monkeypatch.setenv("OTHER", crypto.new_key_text())
    capsys.readouterr()
    assert main(["privacy", "decrypt", str(tmp_path / "d.jsonl.enc"), "--out", str(tmp_path / "x.jsonl"),
                 "--key-env", "OTHER"]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "x.jsonl").exists()
    # a folder: every file encrypted in place of the same name, and back
    (tmp_path / "m" / "sub").mkdir(parents=True)
    (tmp_path / "m" / "sub" / "w.bin").write_bytes(os.urandom(70000))
    (tmp_path / "m" / "config.json").write_text("{}")
    assert main(["privacy", "encrypt", str(tmp_path / "m"), "--out", str(tmp_path / "m.sealed"), *kf]) == 0
    assert crypto.is_encrypted(tmp_path / "m.sealed" / "sub" / "w.bin")
    assert main(["privacy", "decrypt", str(tmp_path / "m.sealed"), "--out", str(tmp_path / "m2"), *kf]) == 0
    assert (tmp_path / "m2" / "sub" / "w.bin").read_bytes() == (tmp_path / "m" / "sub" / "w.bin").read_bytes()


# ---- readers --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,body", [
    ("d.jsonl", "".join(json.dumps({"instruction": f"q{i} {MARKER}", "output": "a"}) + "\n" for i in range(5))),
    ("d.json", json.dumps([{"instruction": f"q{i} {MARKER}", "output": "a"} for i in range(5)])),
    ("d.csv", "instruction,output\n" + "".join(f"q{i} {MARKER},a\n" for i in range(5))),
    ("d.txt", f"some text {MARKER}\n"),
])
def test_readers_open_encrypted_files_by_their_inner_name(tmp_path: Path, key: crypto.Key, name: str,
                                                           body: str) -> None:
    from lmtailor.data.sources import read_records
    from lmtailor.data.validate import load_examples

    (tmp_path / name).write_text(body)
    crypto.encrypt_file(tmp_path / name, tmp_path / f"{name}.enc", key)
    (tmp_path / name).unlink()
    plain = [r.data for r in read_records(str(tmp_path / f"{name}.enc"))]
    assert plain and MARKER in json.dumps(plain)
    assert [r.data for r in read_records(str(tmp_path))] == plain  # found in a folder by its inner suffix
    assert load_examples(str(tmp_path / f"{name}.enc"))


def test_tokenizer_corpus_reads_encrypted_text(tmp_path: Path, key: crypto.Key) -> None:
    from lmtailor.tokenizers import corpus_texts

    (tmp_path / "c").mkdir()
    (tmp_path / "a.txt").write_text(f"notes {MARKER}")
    crypto.encrypt_file(tmp_path / "a.txt", tmp_path / "c" / "a.txt.enc", key)
    assert list(corpus_texts(tmp_path / "c")) == [f"notes {MARKER}"]


def test_validate_reads_with_the_key_the_recipe_names(tiny_model: Path, pairs_file: Path, key: crypto.Key,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    enc = pairs_file.with_name("pairs.jsonl.enc")
    crypto.encrypt_file(pairs_file, enc, key)
    common = ["validate", f"base_model={tiny_model}", f"data.path={enc}", "data.val_size=2"]
    monkeypatch.setenv("MY_KEY", os.environ[crypto.DEFAULT_KEY_ENV])
    monkeypatch.delenv(crypto.DEFAULT_KEY_ENV)
    assert main(common) == 2
    err = capsys.readouterr().err
    assert "no key: $LMTAILOR_DATA_KEY is not set" in err and err.count("\n") == 1
    assert main([*common, "privacy.key_env=MY_KEY"]) == 0
    assert "10 records read" in capsys.readouterr().out


# ---- a run on encrypted data ----------------------------------------------------------------------------------------

def _plaintext_hits(root: Path) -> list[str]:
    """Files under `root` holding the marker in plaintext (UTF-8, or escaped as JSON writes non-ASCII)."""
    return [str(p) for p in root.rglob("*") if p.is_file() and MARKER.encode() in p.read_bytes()]


def _staged() -> set[str]:
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("lmtailor-plain-*")} if shm.is_dir() else set()


def _server_answers(slots: dict, names: list[str]) -> None:
    """A server started on sealed runs lists them and answers a chat request for each (real HTTP, uvicorn)."""
    import httpx

    from lmtailor.serve import create_app, running

    with running(create_app(slots)) as url:
        listed = {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]}
        assert set(names) <= listed
        for name in names:
            r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "model": name, "messages": [{"role": "user", "content": "list files"}], "max_tokens": 4,
                "temperature": 0})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"] == name and isinstance(body["choices"][0]["message"]["content"], str)
            assert body["usage"]["completion_tokens"] >= 1


def test_run_on_encrypted_data_writes_no_plaintext_and_reloads_with_the_key(
        tiny_model: Path, tmp_path: Path, key: crypto.Key, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import tempfile

    from conftest import PAIRS

    (tmp_path / "cache").mkdir()
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("LMTAILOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # temporary files land where they are scanned
    staged_before = _staged()
    plain = tmp_path / "d.jsonl"
    plain.write_text("".join(json.dumps({"instruction": f"{q} {i} {MARKER}", "output": f"{a} {MARKER}"}) + "\n"
                             for i in range(3) for q, a in PAIRS))
    enc = tmp_path / "d.jsonl.enc"
    crypto.encrypt_file(plain, enc, key)
    plain.unlink()
    run = tmp_path / "run"
    common = ["train", f"base_model={tiny_model}", f"data.path={enc}", f"output_dir={run}", "max_steps=4",
              "save_every=2", "keep_checkpoints=2", "batch_size=4", "micro_batch_size=2", "lr=5e-3",
              "data.val_size=3", "eval.generate_examples=2", "generation.max_new_tokens=4", "--no-progress"]
    assert main(common) == 0  # encrypt_outputs unset: on, because the data is encrypted
    assert _plaintext_hits(tmp_path) == []
    model_files = [p for p in (run / "model").iterdir()]
    assert model_files and all(crypto.is_encrypted(p) for p in model_files)
    ckpt = run / "checkpoints" / "step-000002"
    assert all(crypto.is_encrypted(p) for p in ckpt.iterdir())
    assert crypto.is_encrypted(run / "metrics.json.enc") and not (run / "metrics.json").exists()
    assert MARKER in crypto.read_bytes(run / "metrics.json.enc").decode()  # the samples are there, sealed

    # resume from the sealed checkpoint of step 2 (the last step writes the model, not a checkpoint)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]
    capsys.readouterr()
    assert main([*common, "resume=true"]) == 0
    assert "at step 2" in capsys.readouterr().out

    # eval and generate read the sealed model with the key; eval's metrics file is sealed too
    out = tmp_path / "eval.json"
    assert main(["eval", str(run), "--data", str(enc), "--generate", "2", "--out", str(out)]) == 0
    assert crypto.is_encrypted(out) and "loss" in json.loads(crypto.read_bytes(out))
    assert main(["generate", str(run), "list files", "--max-new-tokens", "3"]) == 0
    # serve: two sealed adapter runs on one base (the second goes through add_adapter_to); export merges one
    from lmtailor.serve.models import load_models

    shutil.copytree(run, tmp_path / "run2")
    slots = load_models([str(run), str(tmp_path / "run2")])
    assert {"run", "run2"} <= set(slots)
    _server_answers(slots, ["run", "run2"])
    assert main(["export", str(run), "--format", "merged", "--out", str(tmp_path / "merged")]) == 0
    assert _plaintext_hits(tmp_path) == []
    assert _staged() == staged_before  # nothing decrypted is left in RAM-backed staging either

    # the sealed reports decrypt back to what a plain run writes
    for name in ("metrics.json", "report.html"):
        assert main(["privacy", "decrypt", str(run / f"{name}.enc"), "--out", str(tmp_path / name)]) == 0
    assert "after" in json.loads((tmp_path / "metrics.json").read_text())
    assert (tmp_path / "report.html").read_text().lstrip().lower().startswith("<!doctype html")
    # the model folder decrypts back to an ordinary HF adapter folder
    assert main(["privacy", "decrypt", str(run / "model"), "--out", str(tmp_path / "plain-model")]) == 0
    assert json.loads((tmp_path / "plain-model" / "adapter_config.json").read_text())["peft_type"] == "LORA"

    # without the key: one line, exit 2
    monkeypatch.delenv(crypto.DEFAULT_KEY_ENV)
    capsys.readouterr()
    assert main(["generate", str(run), "list files", "--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err
    assert "no key" in err and err.count("\n") == 1


def _scan_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Cache and temporary files under `tmp_path` (where `_plaintext_hits` looks); the staging folders before."""
    import tempfile

    (tmp_path / "cache").mkdir()
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("LMTAILOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return _staged()


def test_sealed_pretraining_run_seals_its_token_cache_and_reuses_it(
        tiny_model: Path, tmp_path: Path, key: crypto.Key, monkeypatch: pytest.MonkeyPatch) -> None:
    """pretrain.cache in a sealed run: the token cache (blocks, validation documents, stats) is built in RAM and
    sealed; a second run decrypts it into memory instead of rebuilding; another key rebuilds it."""
    from conftest import CORPUS

    staged_before = _scan_setup(tmp_path, monkeypatch)
    plain = tmp_path / "docs.jsonl"
    plain.write_text("".join(json.dumps({"text": " ".join(CORPUS[i:i + 4]) + f" {MARKER} ({i})"}) + "\n"
                             for i in range(30)))
    enc = crypto.encrypt_file(plain, tmp_path / "docs.jsonl.enc", key)
    plain.unlink()
    args = ["train", f"base_model={tiny_model}", "objective=clm", f"data.path={enc}", "pretrain.cache=true",
            "max_steps=2", "batch_size=4", "max_length=32", "data.val_size=4", "method=full", "eval_every=1",
            "eval.generate_examples=0", "--no-progress"]
    assert main([*args, f"output_dir={tmp_path / 'a'}"]) == 0
    caches = [p for p in (tmp_path / "cache" / "tokens").rglob("*") if p.is_file()]
    assert {p.name for p in caches} == {"train.arrow", "val.arrow", "val-docs.arrow", "stats.json"}
    assert all(crypto.is_encrypted(p) for p in caches)
    assert _plaintext_hits(tmp_path) == []
    assert main([*args, f"output_dir={tmp_path / 'b'}"]) == 0
    a, b = (json.loads(crypto.read_bytes(tmp_path / n / "metrics.json.enc"))["data"] for n in "ab")
    assert a["train_cache_reused"] is False and b["train_cache_reused"] is True
    assert a["train_blocks"] == b["train_blocks"] > 2
    # eval on the sealed run reads the sealed model; the cache stays sealed
    assert main(["eval", str(tmp_path / "a"), "--data", str(enc), "--metric", "perplexity", "--context", "16"]) == 0
    assert _plaintext_hits(tmp_path) == []
    assert _staged() == staged_before


def test_sealed_token_cache_opens_with_its_key_and_is_rebuilt_under_another(
        tiny_model: Path, tmp_path: Path, key: crypto.Key) -> None:
    from transformers import AutoTokenizer

    from lmtailor.pretrain.corpus import token_cache

    tok = AutoTokenizer.from_pretrained(tiny_model)
    docs = [f"list files {MARKER} {i}" for i in range(20)]
    built = []
    for k in (key, key, _other_key()):
        with crypto.seal_outputs(k):
            blocks = token_cache(lambda: docs, tok, 16, root=tmp_path)
        built.append((blocks.reused, len(blocks), blocks[0].input_ids))
    assert [b[0] for b in built] == [False, True, False] and built[0][1:] == built[1][1:] == built[2][1:]
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and crypto.is_encrypted(files[0]) and _plaintext_hits(tmp_path) == []
    with crypto.seal_outputs(None):  # a plain run keeps its own, memory-mapped, cache
        assert not token_cache(lambda: docs, tok, 16, root=tmp_path).reused


def test_prompt_verbs_on_encrypted_data_seal_their_score_cache_and_outputs(
        tiny_model: Path, tmp_path: Path, key: crypto.Key, monkeypatch: pytest.MonkeyPatch) -> None:
    """prompt run / optimize and compare on an encrypted data file: the score cache (generated answers) and the
    predictions, metrics and reports are sealed; a second run reads the sealed cache (no model calls)."""
    import yaml

    from conftest import PAIRS

    staged_before = _scan_setup(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    plain = tmp_path / "qa.jsonl"
    plain.write_text("".join(json.dumps({"instruction": f"{q} {i} {MARKER}", "output": f"{a} {MARKER}"}) + "\n"
                             for i in range(2) for q, a in PAIRS))
    enc = crypto.encrypt_file(plain, tmp_path / "qa.jsonl.enc", key)
    plain.unlink()
    task = tmp_path / "qa-task.yaml"
    task.write_text(yaml.safe_dump({
        "name": "qa", "inputs": ["input"], "output": {"field": "output"}, "metric": "chrf", "max_new_tokens": 3,
        "templates": ["Command for: {{ input }}"], "few_shot": {"k": 1, "strategy": "nearest"}, "dev_size": 4,
        "data": {"path": str(enc), "val_size": 4},
        "search": {"budget": 12, "paraphrases": 0, "shots": [0, 1], "strategies": ["nearest"], "min_examples": 2}}))
    assert main(["prompt", "run", str(task), "--model", str(tiny_model), "--out", "pr"]) == 0
    assert {p.name for p in (tmp_path / "pr").iterdir()} == {"metrics.json.enc", "predictions.jsonl.enc"}
    assert MARKER in crypto.read_bytes(tmp_path / "pr" / "predictions.jsonl.enc").decode()  # references, sealed
    first = json.loads(crypto.read_bytes(tmp_path / "pr" / "metrics.json.enc"))
    cache = tmp_path / "cache" / "prompt-scores" / "scores.sqlite.enc"
    assert first["calls"] > 0 and crypto.is_encrypted(cache)
    assert not (tmp_path / "cache" / "prompt-scores" / "scores.sqlite").exists()
    assert main(["prompt", "run", str(task), "--model", str(tiny_model), "--out", "pr2"]) == 0
    assert json.loads(crypto.read_bytes(tmp_path / "pr2" / "metrics.json.enc"))["calls"] == 0  # all cached

    assert main(["prompt", "optimize", str(task), "--model", str(tiny_model), "--out", "search"]) == 0
    search = {p.name for p in (tmp_path / "search").iterdir()}
    assert search == {"best_task.yaml", "candidates.json.enc", "search.png.enc", "report.html.enc"}
    assert main(["compare", str(task), "zero-shot", "search", "--model", str(tiny_model), "--out", "cmp"]) == 0
    assert {p.name for p in (tmp_path / "cmp").iterdir()} == {"compare.json.enc", "compare.md.enc",
                                                              "compare.png.enc", "report.html.enc"}
    assert _plaintext_hits(tmp_path) == []
    assert _staged() == staged_before


def test_sealed_score_cache_persists_under_its_key_and_leaves_another_keys_copy_alone(
        tmp_path: Path, key: crypto.Key) -> None:
    from lmtailor.prompting.scoring import ScoreCache

    path = tmp_path / "scores.sqlite.enc"
    ScoreCache(path, key).put_many({"a": [1.5, -2.0], "b": f"answer {MARKER}"})
    assert crypto.is_encrypted(path) and _plaintext_hits(tmp_path) == []
    assert ScoreCache(path, key).get_many(["a", "b"]) == {"a": [1.5, -2.0], "b": f"answer {MARKER}"}
    sealed = path.read_bytes()
    other = ScoreCache(path, _other_key())  # another key: in memory only, the sealed copy is not overwritten
    assert other.get_many(["a"]) == {}
    other.put_many({"c": 1.0})
    assert path.read_bytes() == sealed and len(other) == 1
