"""Golden outputs from transformers (PyTorch) for the Qwen2.5-VL vision tests.

Run in the reference environment (Python 3.11, torch, transformers 5.x), one call per test
module because importing torch is slow:

    python tests/reference/hf_vision_reference.py MODE SPEC.json OUT_DIR

MODE is `vision` (the vision tower on random weights), `rope` (`get_rope_index`),
`preprocess` (the image processor) or `vl` (the whole image-text model's logits). The test
modules call `run_reference`, which finds the interpreter through DREAM_R_JAX_REF_PYTHON.
The top level of this file imports only the standard library so that the tests can import it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def reference_python() -> str:
  """The reference interpreter, or a pytest skip (a failure when CI is set)."""
  import pytest  # pylint: disable=g-import-not-at-top
  path = os.environ.get("DREAM_R_JAX_REF_PYTHON",
                        os.path.join(_REPO, ".venv-ref", "bin", "python"))
  if not os.path.exists(path):
    msg = (f"reference Python {path!r} not found (set DREAM_R_JAX_REF_PYTHON or run "
           "scripts/setup_env.sh); the transformers parity tests need it")
    if os.environ.get("CI"):
      pytest.fail(msg)
    pytest.skip(msg)
  return path


def run_reference(mode: str, spec: dict, out_dir: str) -> str:
  """Runs this script in the reference environment; returns `out_dir`."""
  os.makedirs(out_dir, exist_ok=True)
  spec_path = os.path.join(out_dir, "spec.json")
  with open(spec_path, "w") as f:
    json.dump(spec, f)
  proc = subprocess.run([reference_python(), os.path.abspath(__file__), mode, spec_path,
                         out_dir], capture_output=True, text=True, timeout=600,
                        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
  if proc.returncode:
    raise RuntimeError(f"reference script ({mode}) failed:\n{proc.stdout}\n{proc.stderr}")
  return out_dir


# ------------------------------------------------------------------------------------------
# Below: runs in the reference environment only.
# ------------------------------------------------------------------------------------------
def _randomize(model, seed: int, scale: float) -> None:
  """Every parameter random (norm weights around 1), so each one affects the output."""
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * scale
      p.copy_(1.0 + noise if ("norm" in name or "ln_q" in name) else noise)


def _vision(spec: dict, out: str) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m  # pylint: disable=g-import-not-at-top
  from transformers import vision_utils  # pylint: disable=g-import-not-at-top

  cfg = m.Qwen2_5_VLVisionConfig(**spec["config"])
  cfg._attn_implementation = "eager"  # pylint: disable=protected-access
  model = m.Qwen2_5_VisionTransformerPretrainedModel(cfg).eval()
  _randomize(model, spec["seed"], spec["scale"])
  save_file({spec["prefix"] + k: v.contiguous() for k, v in model.state_dict().items()},
            os.path.join(out, "vision.safetensors"))
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(cfg.to_dict(), f)
  gen = torch.Generator().manual_seed(spec["seed"] + 1)
  patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
  for i, grid in enumerate(spec["grids"]):
    grid_t = torch.tensor(grid, dtype=torch.long)
    pixels = torch.randn(int(grid_t.prod(-1).sum()), patch_dim, generator=gen)
    with torch.no_grad():
      feats = model(pixels, grid_thw=grid_t).pooler_output
    win, cu_win = vision_utils.get_vision_window_index(
        grid_t, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size)
    np.savez(os.path.join(out, f"case{i}.npz"), pixel_values=pixels.numpy(),
             features=feats.numpy(), window_index=win.numpy(),
             cu_window_seqlens=cu_win.numpy(),
             position_ids=vision_utils.get_vision_position_ids(
                 grid_t, cfg.spatial_merge_size).numpy())


def _rope(spec: dict, out: str) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel  # pylint: disable=g-import-not-at-top

  cfg = Qwen2_5_VLConfig(**spec["config"])
  model = Qwen2_5_VLModel(cfg).eval()
  for i, case in enumerate(spec["cases"]):
    ids = torch.tensor(case["input_ids"], dtype=torch.long)
    types = (ids == cfg.image_token_id).long()
    mask = None if case["attention_mask"] is None else torch.tensor(case["attention_mask"])
    pos, deltas = model.get_rope_index(
        ids, mm_token_type_ids=types,
        image_grid_thw=torch.tensor(case["image_grid_thw"], dtype=torch.long),
        attention_mask=mask)
    np.savez(os.path.join(out, f"case{i}.npz"), positions=pos.numpy(),
             deltas=deltas.numpy().reshape(-1))


def _preprocess(spec: dict, out: str) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as pil_proc  # pylint: disable=g-import-not-at-top

  data = np.load(os.path.join(out, "images.npz"))
  for i, case in enumerate(spec["cases"]):
    proc = pil_proc.Qwen2VLImageProcessorPil(min_pixels=case["min_pixels"],
                                             max_pixels=case["max_pixels"])
    images = [data[name] for name in case["images"]]
    result = proc(images=images, return_tensors="np")
    np.savez(os.path.join(out, f"case{i}.npz"), pixel_values=result["pixel_values"],
             image_grid_thw=result["image_grid_thw"])


def _vl(spec: dict, out: str) -> None:
  """Random-weight model from out/model/config.json; saves its weights and logits per case."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration  # pylint: disable=g-import-not-at-top

  model_dir = os.path.join(out, "model")
  cfg = AutoConfig.from_pretrained(model_dir)
  cfg._attn_implementation = "eager"  # pylint: disable=protected-access
  model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
  _randomize(model, spec["seed"], spec["scale"])
  model.save_pretrained(model_dir)
  for i in range(spec["num_cases"]):
    inputs = np.load(os.path.join(out, f"inputs{i}.npz"))
    ids = torch.tensor(inputs["input_ids"], dtype=torch.long)
    with torch.no_grad():
      logits = model(input_ids=ids,
                     attention_mask=torch.tensor(inputs["attention_mask"]),
                     pixel_values=torch.tensor(inputs["pixel_values"]),
                     image_grid_thw=torch.tensor(inputs["image_grid_thw"]),
                     mm_token_type_ids=(ids == cfg.image_token_id).long()).logits
    np.savez(os.path.join(out, f"logits{i}.npz"), logits=logits.numpy())


def main(argv) -> None:
  mode, spec_path, out = argv[1:4]
  with open(spec_path) as f:
    spec = json.load(f)
  {"vision": _vision, "rope": _rope, "preprocess": _preprocess, "vl": _vl}[mode](spec, out)


if __name__ == "__main__":
  main(sys.argv)
