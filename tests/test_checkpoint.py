"""Checkpoints: atomic writes, PEFT adapters (both directions), trajectory log, resumable ckpts."""
import json
import os

import pytest
import torch

from mezo.checkpoint import (TrainingCheckpoint, TrajectoryLog, TrajectoryRecord, atomic_save_safetensors,
                             atomic_write, atomic_write_json, latest_checkpoint, load_peft_adapter,
                             normalize_peft_key, save_peft_adapter)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

R, ALPHA = 4, 8


def tiny_llama(seed: int = 0):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


# ---- atomic writes ------------------------------------------------------------------------------
def test_atomic_write_interrupted_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_json(target, {"v": 1})

    def half_then_crash(fh):
        fh.write(b'{"v": 2, "trunc')
        raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_crash)
    assert json.loads(target.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["state.json"]
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "new.bin", lambda fh: (_ for _ in ()).throw(RuntimeError("boom")))
    assert os.listdir(tmp_path) == ["state.json"]  # no partial new file either


def test_atomic_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file
    t = {"a": torch.randn(3, 4).t(), "b": torch.arange(5)}  # non-contiguous input is fine
    atomic_save_safetensors(tmp_path / "x.safetensors", t)
    back = load_file(tmp_path / "x.safetensors")
    assert torch.equal(back["a"], t["a"]) and torch.equal(back["b"], t["b"])


# ---- PEFT adapters ------------------------------------------------------------------------------
def random_adapter(model, layers=(0, 1), seed=1):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in layers:
        for mod in ("q_proj", "v_proj"):
            lin = getattr(model.model.layers[i].self_attn, mod)
            key = f"model.layers.{i}.self_attn.{mod}"  # short form; saved with the PEFT prefix
            out[f"{key}.lora_A.weight"] = torch.randn(R, lin.in_features, generator=g) * 0.2
            out[f"{key}.lora_B.weight"] = torch.randn(lin.out_features, R, generator=g) * 0.2
    return out


@pytest.mark.parametrize("layers", [(0, 1), (1,)])
def test_adapter_loads_in_peft_and_matches_manual_merge(tmp_path, layers):
    base_dir, ad_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(base_dir)
    ref = transformers.LlamaForCausalLM.from_pretrained(base_dir).eval()
    tensors = random_adapter(ref, layers)
    save_peft_adapter(ad_dir, tensors, r=R, alpha=ALPHA, target_modules=("q_proj", "v_proj"),
                      base_model_name_or_path=str(base_dir),
                      layers_to_transform=list(layers) if layers != (0, 1) else None)
    assert sorted(os.listdir(ad_dir)) == ["adapter_config.json", "adapter_model.safetensors"]

    base = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    pm = peft.PeftModel.from_pretrained(base, str(ad_dir)).eval()
    with torch.no_grad():
        for i in layers:
            for mod in ("q_proj", "v_proj"):
                key = f"model.layers.{i}.self_attn.{mod}"
                lin = getattr(ref.model.layers[i].self_attn, mod)
                lin.weight += tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"] * (ALPHA / R)
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
        expect, got = ref(input_ids=ids).logits, pm(input_ids=ids).logits
        plain = transformers.LlamaForCausalLM.from_pretrained(base_dir).eval()(input_ids=ids).logits
    assert (expect - plain).abs().max() > 1e-3  # the adapter really changes the output
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


def test_load_adapter_written_by_peft(tmp_path):
    model = tiny_llama()
    pm = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"],
                                                    lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    pm.save_pretrained(tmp_path)
    tensors, cfg = load_peft_adapter(tmp_path)
    assert cfg["r"] == R and cfg["lora_alpha"] == ALPHA and set(cfg["target_modules"]) == {"q_proj", "v_proj"}
    live = {normalize_peft_key(n): p for n, p in pm.named_parameters() if "lora_" in n}
    assert set(tensors) == set(live) and len(tensors) == 8
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    for k, v in tensors.items():
        assert torch.equal(v, live[k].detach()), k
    # and our writer round-trips what we read
    save_peft_adapter(tmp_path / "again", tensors, r=R, alpha=ALPHA, target_modules=cfg["target_modules"],
                      base_model_name_or_path="x")
    again, _ = load_peft_adapter(tmp_path / "again")
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_key_normalisation_and_bad_adapters(tmp_path):
    full = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert normalize_peft_key("model.layers.0.self_attn.q_proj.lora_A.default.weight") == full
    assert normalize_peft_key(full.replace("lora_A", "lora_A.default")) == full
    assert normalize_peft_key(full) == full
    with pytest.raises(ValueError, match="not a LoRA weight key"):
        normalize_peft_key("model.layers.0.self_attn.q_proj.weight")
    a = {"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(R, 8)}
    kw = dict(r=R, alpha=ALPHA, target_modules=["q_proj"], base_model_name_or_path="x")
    with pytest.raises(ValueError, match="needs both lora_A and lora_B"):
        save_peft_adapter(tmp_path, a, **kw)
    a["model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(8, R + 1)
    with pytest.raises(ValueError, match=r"must be \[r=4, in\]"):
        save_peft_adapter(tmp_path, a, **kw)
    with pytest.raises(ValueError, match="not a PEFT adapter"):
        load_peft_adapter(tmp_path / "missing")


# ---- trajectory log -----------------------------------------------------------------------------
def test_trajectory_log_tolerates_torn_last_line(tmp_path):
    path = tmp_path / "traj.jsonl"
    log = TrajectoryLog(path)
    recs = [TrajectoryRecord(0, 11, 0.5, 1e-4, 2.3), TrajectoryRecord(1, 12, [0.1, -0.2], 1e-4, float("nan"))]
    for r in recs:
        log.append(r)
    with open(path, "a") as fh:
        fh.write('{"step": 2, "seed": 13, "projected_')  # killed mid-append
    got = log.read()  # read() alone tolerates the torn line
    assert got[0] == recs[0] and got[1].projected_grad == [0.1, -0.2] and len(got) == 2
    reopened = TrajectoryLog(path)  # resuming drops the torn tail before appending
    reopened.append(TrajectoryRecord(2, 13, 0.0, 1e-4, 1.0))
    assert [r.step for r in reopened.read()] == [0, 1, 2]
    reopened.truncate(1)
    assert reopened.read() == [recs[0]]
    with open(path, "a") as fh:  # whole JSON but no newline yet: not committed, read and reopen agree
        fh.write('{"step": 1, "seed": 1, "projected_grad": 0.1, "lr": 1, "loss": 1}')
    assert reopened.read() == [recs[0]] == TrajectoryLog(path).read()


def test_trajectory_log_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "traj.jsonl"
    path.write_text('{"step": 0, "seed": 1, "projected_grad": 0.1, "lr": 1, "loss": 1}\ngarbage\n'
                    '{"step": 1, "seed": 1, "projected_grad": 0.1, "lr": 1, "loss": 1}\n')
    with pytest.raises(ValueError, match="traj.jsonl:2: corrupt trajectory record"):
        TrajectoryLog(path).read()


# ---- training checkpoints ----------------------------------------------------------------------
def test_training_checkpoint_round_trip_and_latest(tmp_path):
    t = {"layers.0.q.lora_A": torch.randn(4, 8), "layers.0.q.lora_B": torch.randn(8, 4)}
    assert latest_checkpoint(tmp_path) is None
    for step in (10, 200, 30):
        TrainingCheckpoint(step, t, {"lr": 1e-4}, trajectory_len=step).save(tmp_path)
    (tmp_path / ".tmp-ckpt-900-abc").mkdir()  # a save killed before its rename
    (tmp_path / "ckpt-500").mkdir()  # not complete (no state.json)
    best = latest_checkpoint(tmp_path)
    assert best == tmp_path / "ckpt-200"
    ck = TrainingCheckpoint.load(best)
    assert ck.step == 200 and ck.trajectory_len == 200 and ck.config == {"lr": 1e-4}
    assert all(torch.equal(ck.tensors[k], t[k]) for k in t)
    TrainingCheckpoint(200, {k: v + 1 for k, v in t.items()}, {}, 201).save(tmp_path)  # overwrite
    assert TrainingCheckpoint.load(tmp_path / "ckpt-200").trajectory_len == 201
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".old")]


def test_checkpoint_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    import mezo.checkpoint as ckmod

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckmod, "atomic_write_json", crash)
    with pytest.raises(OSError):
        TrainingCheckpoint(5, {"x": torch.ones(2)}, {}, 5).save(tmp_path)
    assert os.listdir(tmp_path) == [] and latest_checkpoint(tmp_path) is None
