"""The JAX IterativeSFTTrainer shell: compile counts, split invariance, saving, hub, reporting (TRL's defects:
test_trl_regressions.py, on both engines; the shared contract: test_contract.py)."""

import base64
import glob
import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM, TrainingArguments

from itersft_jax import IterativeSFTConfig, IterativeSFTTrainer
from itersft_jax.shared.data import prepare_examples
from tests.support.compilations import count_compilations
from tests.support.engines import make_trainer

TEXTS = ["hello world", "The quick brown fox jumps", "a b c", "Iterative supervised fine-tuning",
         "Rejection sampling keeps only", "12 + 30 = 42."]


def params_np(trainer):
    return jax.tree.map(np.asarray, jax.device_get(nnx.to_pure_dict(trainer.params)))


def max_abs_diff(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a, b)))


def test_same_bucket_compiles_once(llama_dir, tmp_path, tokenizer):
    trainer = make_trainer("jax", llama_dir, None, tmp_path, fast=True, per_device_train_batch_size=4)
    rng = np.random.default_rng(0)
    with count_compilations() as compiles:
        for _ in range(20):  # lengths 33..48 all fall in the 48 bucket
            ids = [rng.integers(3, 300, size=int(n)).tolist() for n in rng.integers(33, 49, size=4)]
            trainer.step(input_ids=ids)
    assert compiles.count == 1
    with count_compilations() as compiles:
        trainer.step(input_ids=[list(range(3, 100))] * 4)  # a new bucket (128)
    assert compiles.count == 1


def test_split_invariance_through_the_trainer(llama_dir, tmp_path):
    results = []
    for batch, accum in ((4, 1), (2, 2), (1, 4)):
        trainer = make_trainer("jax", llama_dir, None, tmp_path, fast=True, per_device_train_batch_size=batch,
                               gradient_accumulation_steps=accum, max_grad_norm=1.0, weight_decay=0.1)
        out = trainer.step(texts=TEXTS[:4])
        results.append((out["loss"], params_np(trainer)))
    for loss, params in results[1:]:
        assert loss == pytest.approx(results[0][0], abs=1e-5)
        assert max_abs_diff(params, results[0][1]) <= 1e-5


def test_save_model_round_trip(llama_dir, tmp_path, tokenizer):
    trainer = make_trainer("jax", llama_dir, None, tmp_path, fast=True, per_device_train_batch_size=1)
    trainer.step(texts=TEXTS[:4])
    out_dir = trainer.save_model(str(tmp_path / "final"))
    hf = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    batch = tokenizer(["The quick brown fox"], return_tensors="pt")
    with torch.no_grad():
        expected = hf(**batch).logits.numpy()
    ids = batch["input_ids"].numpy()
    mask = batch["attention_mask"].numpy()
    from itersft_jax.models.attention.masks import positions_from_mask

    logits, _ = trainer.model(ids, positions_from_mask(mask), mask)
    assert np.abs(np.asarray(logits) - expected).max() <= 1e-4  # fp32 tolerance


def test_pretrained_model_object_and_plain_training_arguments(llama_dir, tmp_path, tokenizer):
    hf = AutoModelForCausalLM.from_pretrained(llama_dir)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, report_to="none")
    trainer = IterativeSFTTrainer(hf, args=args, processing_class=tokenizer)
    assert isinstance(trainer.args, IterativeSFTConfig)
    from_dir = make_trainer("jax", llama_dir, None, tmp_path, fast=True)
    assert max_abs_diff(params_np(trainer), params_np(from_dir)) == 0
    assert trainer.step(texts=TEXTS[:2])["updates"] == 1


def test_unknown_model_type_suggests_torch(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="backend='torch'"):
        make_trainer("jax", tiny_model_dir("bart"), None, tmp_path, fast=True)


def test_fp32_training_uses_full_precision_matmuls(llama_dir, tmp_path):
    # XLA runs fp32 matmuls as TF32 on GPUs unless told otherwise: measured on an H100, 3e-4 max logit
    # difference against torch fp32 (2e-7 at "highest"). fp32 training must ask for full precision;
    # bf16 (or tf32=True) leaves XLA's default.
    from itersft_jax.shared.data import collate

    batch = collate([prepare_examples(input_ids=[[5, 6, 7, 8]])], rows=2, length=16)
    for kwargs, expected in ((dict(), True), (dict(bf16=True), False)):  # tf32=True needs a GPU to construct
        trainer = make_trainer("jax", llama_dir, None, tmp_path, fast=True, **kwargs)
        with trainer.precision():
            text = trainer.train_step.lower(trainer.train_state, batch).as_text()
        assert ("precision = [HIGHEST, HIGHEST]" in text) is expected, kwargs


def test_evaluate_packs_like_a_step_and_runs_with_remat(llama_dir, tmp_path):
    # evaluate() == transformers is a contract test (test_contract.py); here: the packed evaluation gives the
    # loss of a one-update step on the same samples (1e-5, fp32), also with gradient_checkpointing's remat.
    trainer = make_trainer("jax", llama_dir, None, tmp_path, fast=True, per_device_train_batch_size=3,
                           gradient_accumulation_steps=2)
    metrics = trainer.evaluate(texts=TEXTS)
    remat = make_trainer("jax", llama_dir, None, tmp_path, fast=True, gradient_checkpointing=True)
    assert remat.evaluate(texts=TEXTS)["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-5)
    assert trainer.step(texts=TEXTS)["loss"] == pytest.approx(metrics["eval_loss"], abs=1e-5)  # one update
    with pytest.raises(ValueError, match="eval_dataset"):
        trainer.evaluate()
    with pytest.raises(ValueError, match="eval_dataset"):
        make_trainer("jax", llama_dir, None, tmp_path, fast=True, eval_strategy="steps")


class _LocalHub:
    """A local HTTP endpoint speaking the four Hub routes an upload uses (create repo, validate the model card,
    preupload, commit); it records every commit's files. Every file is declared "regular" (inline base64)."""

    def __init__(self):
        import http.server
        import threading

        self.commits: list[dict] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/api/repos/create":
                    name = json.loads(body)["name"]
                    return self._reply({"url": f"{hub.url}/user/{name}", "name": f"user/{name}"})
                if self.path == "/api/validate-yaml":
                    return self._reply({"errors": [], "warnings": []})
                if "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    return self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})
                if "/commit/" in self.path:
                    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                    hub.commits.append({
                        "repo": self.path.split("/api/models/")[1].split("/commit/")[0],
                        "message": lines[0]["value"]["summary"],
                        "files": {x["value"]["path"]: base64.b64decode(x["value"]["content"])
                                  for x in lines if x["key"] == "file"}})
                    return self._reply({"commitUrl": f"{hub.url}/user/repo/commit/{len(hub.commits)}",
                                        "commitOid": f"{len(hub.commits):040x}"})
                self.send_error(404)

            def _reply(self, payload):
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_push_to_hub_uploads_checkpoints_and_the_final_model_with_a_card(llama_dir, tmp_path, monkeypatch):
    """Through huggingface_hub against a local endpoint: each save_steps checkpoint pushes its model files
    (not the train state), and push_to_hub() uploads output_dir with a model card whose metadata parses."""
    from huggingface_hub import ModelCard, constants

    hub = _LocalHub()
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    trainer = make_trainer("jax", llama_dir, None, tmp_path / "run", fast=True, per_device_train_batch_size=1,
                           save_strategy="steps", save_steps=2, push_to_hub=True, hub_model_id="tiny-itersft")
    trainer.step(texts=TEXTS[:2])
    info = trainer.push_to_hub()
    hub.server.shutdown()
    assert [c["message"] for c in hub.commits] == ["Training in progress, step 2", "End of training"]
    assert {c["repo"] for c in hub.commits} == {"user/tiny-itersft"} and info.oid == f"{2:040x}"
    checkpoint_files = set(hub.commits[0]["files"])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= checkpoint_files
    assert not any(f.startswith("train_state") or f == "itersft_state.json" for f in checkpoint_files)
    final = hub.commits[1]["files"]
    with open(tmp_path / "run" / "model.safetensors", "rb") as f:
        assert final["model.safetensors"] == f.read()
    assert not any(f.startswith("checkpoint-") for f in final)
    card = ModelCard(final["README.md"].decode())
    assert card.data.library_name == "transformers" and {"itersft", "jax"} <= set(card.data.tags)


def test_report_to_wandb_offline_records_every_logged_update(llama_dir, tmp_path, monkeypatch):
    """transformers' WandbCallback on the JAX engine, W&B offline: the run is given loss, learning rate, grad
    norm and tokens/s of every logged update, at its global step. What reaches ``Run.log`` is recorded by a
    wrapper that forwards every call to the real method (reading the offline run file back proved flaky: W&B's
    background writer sometimes had not persisted the history when the test read it)."""
    import wandb
    from wandb.sdk.wandb_run import Run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged_rows = []
    real_log = Run.log

    def recording_log(self, data, *args, **kwargs):
        logged_rows.append(dict(data))
        return real_log(self, data, *args, **kwargs)

    monkeypatch.setattr(Run, "log", recording_log)
    trainer = make_trainer("jax", llama_dir, None, tmp_path / "run", fast=True, per_device_train_batch_size=1,
                           report_to="wandb")
    trainer.step(texts=TEXTS[:3])
    trainer.end_training()
    wandb.finish()
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))  # a real offline run was written
    rows = [r for r in logged_rows if "train/loss" in r]
    assert [r["train/global_step"] for r in rows] == [1, 2, 3]
    for row, logged in zip(rows, trainer.state.log_history):
        for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second"):
            assert row[f"train/{key}"] == pytest.approx(logged[key], rel=1e-9)
