"""Settings validation, flag translation, presets and the stage registry (no compilation)."""
import pytest

from dream_r_jax.data import tokenizer as tok_lib
from dream_r_jax.train import config as config_lib
from dream_r_jax.train import presets
from dream_r_jax.train import sft
from dream_r_jax.train import stages
from dream_r_jax.train.config import ConfigError, TrainConfig

KNOWN = ("target_sft", "draft_sft")


def _validate(tmp_path, num_devices=8, process_count=1, **kw):
  cfg = TrainConfig(workdir=str(tmp_path), **kw)
  return config_lib.validate(cfg, num_devices=num_devices, process_count=process_count,
                             known_stages=KNOWN)


def test_mesh_shape_fills_the_unknown_axis(tmp_path):
  assert _validate(tmp_path).mesh_shape == (8, 1)
  assert _validate(tmp_path, mesh_shape=(2, -1)).mesh_shape == (2, 4)


@pytest.mark.parametrize("kw, message", [
    (dict(batch_size=0), "--batch_size=0 must be positive"),
    (dict(batch_size=12, mesh_shape=(8, 1)), "not divisible by the mesh's data axis (8)"),
    (dict(mesh_shape=(3, -1)), "does not divide the 8 devices"),
    (dict(mesh_shape=(2, 2)), "uses 4 devices but 8 are available"),
    (dict(mesh_shape=(8,), mesh_axes=("data", "model")), "differ in length"),
    (dict(mesh_axes=("x", "model")), "needs a 'data' axis"),
    (dict(stages=("target_sft", "sapo")), "unknown stage(s) ['sapo']"),
    (dict(stages=("target_sft", "target_sft")), "names a stage twice"),
    (dict(verdict_ratio=1.5), "--verdict_ratio=1.5 must be in [0, 1]"),
    (dict(profile_steps=(5, 2)), "--profile_steps=5,2"),
    (dict(target=config_lib.RoleConfig(preset="nope")), "--target_preset='nope' is unknown"),
    (dict(draft=config_lib.RoleConfig(preset="tiny_vl_draft", overrides={"depth": 2})),
     "--draft_overrides: not ModelConfig fields: ['depth']"),
    (dict(target=config_lib.RoleConfig(preset="tiny_vl_target", checkpoint="/nope")),
     "not a Hugging Face model directory"),
])
def test_invalid_settings_are_named(tmp_path, kw, message):
  with pytest.raises(ConfigError) as e:
    _validate(tmp_path, **kw)
  assert message in str(e.value)


def test_all_errors_are_reported_at_once(tmp_path):
  with pytest.raises(ConfigError) as e:
    _validate(tmp_path, batch_size=-1, log_every=0, eval_split="dev")
  text = str(e.value)
  assert "--batch_size=-1" in text and "--log_every=0" in text and "--eval_split='dev'" in text


def test_batch_must_split_over_processes(tmp_path):
  with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
    _validate(tmp_path, batch_size=8, process_count=3, mesh_shape=(-1, 1))


def test_parse_mapping():
  assert config_lib.parse_mapping("train=10, test=2", what="x") == {"train": 10, "test": 2}
  with pytest.raises(ConfigError, match="'train' is not KEY=VALUE"):
    config_lib.parse_mapping("train", what="x")


def test_flags_translate_to_config(tmp_path):
  from dream_r_jax.train import flags as train_flags  # pylint: disable=g-import-not-at-top
  cfg = train_flags.config_from_args([
      f"--workdir={tmp_path}", "--stages=target_sft", "--target_steps=7",
      "--target_lr=0.01", "--draft_overrides=num_layers=1,mrope_section=(2;3;3)",
      "--mesh_shape=2,-1", "--profile_steps=3,5", "--split_sizes=train=100"])
  assert cfg.stages == ("target_sft",)
  assert cfg.target.optim.steps == 7 and cfg.target.optim.learning_rate == 0.01
  assert cfg.draft.overrides == {"num_layers": 1, "mrope_section": (2, 3, 3)}
  assert cfg.mesh_shape == (2, -1) and cfg.profile_steps == (3, 5)
  assert cfg.split_sizes == {"train": 100}


def test_quickstart_draft_is_ten_times_cheaper_per_token():
  tok = tok_lib.bundled_tokenizer()
  target = presets.model_config("tiny_vl_target", tok)
  draft = presets.model_config("tiny_vl_draft", tok)
  assert target.vocab_size == draft.vocab_size == len(tok)
  assert target.image_token_id == draft.image_token_id == tok.convert_tokens_to_ids(
      tok_lib.IMAGE_PAD)
  assert sft.flops_per_token(target) / sft.flops_per_token(draft) >= 10


def test_overrides_keep_the_vision_tower_consistent():
  tok = tok_lib.bundled_tokenizer()
  cfg = presets.model_config("tiny_vl_target", tok, {"hidden_size": 96})
  assert cfg.vision.out_hidden_size == 96
  assert presets.model_config("qwen2p5_vl_3b").vocab_size == 151936
  with pytest.raises(ValueError, match="unknown model preset"):
    presets.model_config("nope", tok)


def test_flops_per_token_counts_the_head_once():
  from dream_r_jax.models import ModelConfig  # pylint: disable=g-import-not-at-top
  tied = ModelConfig.tiny("qwen2", tie_word_embeddings=True)
  untied = ModelConfig.tiny("qwen2", tie_word_embeddings=False)
  # Tying shares the table with the head; a token pays for the head matmul either way.
  assert sft.flops_per_token(tied) == sft.flops_per_token(untied)
  # Tied: the table is stored once and used once (as the head), so FLOPs = 2 * params.
  assert sft.flops_per_token(tied) == 2 * tied.num_params()


def test_stage_registry_and_plan(tmp_path):
  registry = stages.load_stage_modules()
  assert {"target_sft", "draft_sft"} <= set(registry)
  assert registry["draft_sft"].requires == ("target",)
  assert registry["target_sft"].produces == "target"

  @stages.register_stage("_test_probe", requires=("draft",))
  def _probe(ctx):
    return {"ok": True}

  try:
    cfg = TrainConfig(workdir=str(tmp_path), stages=("target_sft", "_test_probe"))
    with pytest.raises(ConfigError, match="'_test_probe' needs a draft model"):
      stages.check_plan(cfg)
    stages.check_plan(cfg.replace(stages=("target_sft", "draft_sft", "_test_probe")))
    with pytest.raises(ValueError, match="unknown roles"):
      stages.register_stage("_bad", requires=("judge",))
  finally:
    stages._REGISTRY.pop("_test_probe")  # pylint: disable=protected-access
