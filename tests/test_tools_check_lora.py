"""check_lora: positive controls (a file of our own LoRANetwork, files with sd-scripts' exact names for every
family and case) are applied whole by ComfyUI, A1111 and diffusers; negative controls with one defect each get the
right verdict and reason. The diffusers rules are confirmed against diffusers' own conversion functions, and the
LDM names against sd-scripts' SDXL map."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from trainer.errors import ConfigError
from trainer.network import consumers
from trainer.network.lora import LoRANetwork
from trainer.tools import check_lora
from trainer.tools.check_lora import check_lora_file

SPEC_DIR = Path(__file__).resolve().parent / "fixtures" / "lora-keys"
SPEC_CASES = {"sd15.txt": "sd_v1", "sd15-conv.txt": "sd_v1", "sd2.txt": "sd_v2", "sd2-ckpt.txt": "sd_v2",
              "sdxl.txt": "sdxl_base_v1-0", "sdxl-conv.txt": "sdxl_base_v1-0"}
SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")


def spec_rows(name: str) -> list[tuple[str, int, int, str]]:
    rows = []
    for line in (SPEC_DIR / name).read_text(encoding="utf-8").splitlines():
        if line.strip():
            lora_name, dim_in, dim_out, kind = line.split()
            rows.append((lora_name, int(dim_in), int(dim_out), kind))
    return rows


def spec_state(name: str, rank: int = 1) -> dict[str, torch.Tensor]:
    """A trained-looking file with sd-scripts' names and shapes (README of the fixtures: shapes per kind)."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for lora_name, dim_in, dim_out, kind in spec_rows(name):
        down = {"linear": (rank, dim_in), "conv1x1": (rank, dim_in, 1, 1), "conv3x3": (rank, dim_in, 3, 3)}[kind]
        up = (dim_out, rank) if kind == "linear" else (dim_out, rank, 1, 1)
        state[f"{lora_name}.lora_down.weight"] = torch.randn(down, generator=generator)
        state[f"{lora_name}.lora_up.weight"] = torch.randn(up, generator=generator)
        state[f"{lora_name}.alpha"] = torch.tensor(1.0)
    return state


def write(tmp_path: Path, state: dict, version: str = "sd_v1", name: str = "lora.safetensors") -> Path:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"ss_base_model_version": version})
    return path


def renamed(state: dict, old: str, new: str) -> dict:
    return {k.replace(old, new): v for k, v in state.items()}


@pytest.fixture(scope="module")
def sd15_state():
    return spec_state("sd15.txt")


# -- positive controls --------------------------------------------------------------------------------------------


def test_a_file_of_our_own_network_on_the_tiny_model_is_ok(tiny_sd1, tmp_path):
    network = LoRANetwork([tiny_sd1["text_encoder"]], tiny_sd1["unet"], rank=4, alpha=1, conv_rank=2)
    for module in network.lora_modules():
        torch.nn.init.normal_(module.lora_up.weight)
    path = tmp_path / "ours.safetensors"
    network.save_weights(path, metadata={"ss_base_model_version": "sd_v1"})
    report = check_lora_file(path)
    assert report.ok, report.summary_lines()
    assert report.architecture == "tiny-sd1" and report.family == "sd1"
    assert {v.applied_modules for v in report.verdicts.values()} == {len(network.module_names())}
    notes = "\n".join(report.notes)
    assert "TE: 12 modules, lora, rank 4, alpha 1, linear, float32" in notes
    assert "UNet: 79 modules, locon, rank 2 (18), 4 (61)" in notes and "conv3x3 (18)" in notes


@pytest.mark.parametrize("case", SPEC_CASES)
def test_sd_scripts_own_names_are_applied_whole_by_every_consumer(case, tmp_path):
    path = write(tmp_path, spec_state(case), SPEC_CASES[case])
    report = check_lora_file(path)
    assert report.ok, report.summary_lines()[:20]
    assert all(v.applied_modules == len(spec_rows(case)) for v in report.verdicts.values())


def test_our_kohya_names_on_the_meta_architectures_are_sd_scripts_lists():
    """The conv (LoCon) lists are every name sd-scripts can write; SD2 has only the default list."""
    for architecture, case in (("sd15", "sd15-conv.txt"), ("sd2-512", "sd2.txt"), ("sdxl", "sdxl-conv.txt")):
        ours = {(n, layer.in_dim, layer.out_dim) for n, layer in consumers.architecture_layers(architecture).kohya.items()}
        theirs = {(n, i, o) for n, i, o, _ in spec_rows(case)}
        assert theirs <= ours and (ours == theirs or architecture == "sd2-512")


def test_ldm_names_equal_sd_scripts_sdxl_map():
    layers = consumers.architecture_layers("sdxl")
    for line in (SPEC_DIR / "sdxl-diffusers-map.txt").read_text(encoding="utf-8").splitlines():
        lora_name, diffusers_path = line.split()[:2]
        ldm = consumers.ldm_unet_path(diffusers_path, layers.layers_per_block, layers.attention_up_blocks)
        assert "lora_unet_" + ldm.replace(".", "_") == lora_name


def test_sai_and_diffusers_style_unet_names_both_load_in_comfyui_and_a1111(tmp_path):
    """ComfyUI maps both spellings of every UNet weight; A1111 converts diffusers names and takes LDM ones as is."""
    sd15 = consumers.architecture_layers("sd15")
    sai = {k.replace("lora_unet_down_blocks_1_attentions_0_", "lora_unet_input_blocks_4_1_"): v
           for k, v in spec_state("sd15.txt").items()}
    report = check_lora_file(write(tmp_path, sai))
    assert report.verdicts["ComfyUI"].all_applied and report.verdicts["A1111"].all_applied
    # diffusers drops the SGM names when a file mixes both spellings (_maybe_map_sgm_blocks_to_diffusers)
    dropped = report.verdicts["diffusers"].ignored
    assert dropped and all(k.startswith("lora_unet_input_blocks_4_1_") for k in dropped)
    assert "lora_unet_input_blocks_4_1_proj_in" in sd15.accepted("ComfyUI")


# -- negative controls, one defect each ----------------------------------------------------------------------------


def test_text_encoder_keys_without_text_model_are_ignored_by_every_consumer(sd15_state, tmp_path):
    state = renamed(sd15_state, "lora_te_text_model_encoder_", "lora_te_encoder_")
    report = check_lora_file(write(tmp_path, state))
    assert not report.ok
    te_keys = {k for k in state if k.startswith("lora_te_")}
    assert set(report.ignored) == te_keys
    for verdict in report.verdicts.values():
        assert set(verdict.ignored) == te_keys and verdict.applied_modules == 192
    reason = report.ignored["lora_te_encoder_layers_0_mlp_fc1.alpha"]
    assert reason.startswith("ComfyUI, A1111, diffusers: text-encoder name without `text_model_`")
    assert "IGNORED" in "\n".join(report.summary_lines())


def test_an_extra_unknown_module_is_ignored(sd15_state, tmp_path):
    state = dict(sd15_state, **{"lora_unet_foo_proj.lora_down.weight": torch.ones(1, 8),
                                "lora_unet_foo_proj.lora_up.weight": torch.ones(8, 1),
                                "lora_unet_foo_proj.alpha": torch.tensor(1.0)})
    report = check_lora_file(write(tmp_path, state))
    assert set(report.ignored) == {f"lora_unet_foo_proj.{s}" for s in SUFFIXES}
    assert "no layer of the SD1 model" in report.ignored["lora_unet_foo_proj.alpha"]
    assert not report.problems


def test_wrong_shapes_are_problems(sd15_state, tmp_path):
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    bad_layer = dict(sd15_state, **{f"{name}.lora_down.weight": torch.ones(1, 640, 1, 1)})
    report = check_lora_file(write(tmp_path, bad_layer))
    assert any(name in p and "do not fit the layer" in p for p in report.problems), report.problems
    name = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    bad_rank = dict(sd15_state, **{f"{name}.lora_up.weight": torch.ones(3072, 2)})
    problems = check_lora_file(write(tmp_path, bad_rank)).problems
    assert any(name in p and "do not fit together" in p for p in problems)
    bad_alpha = dict(sd15_state, **{f"{name}.alpha": torch.ones(2)})
    assert any("alpha has shape" in p for p in check_lora_file(write(tmp_path, bad_alpha)).problems)


def test_nan_is_a_problem(sd15_state, tmp_path):
    key = "lora_unet_mid_block_attentions_0_proj_out.lora_up.weight"
    state = dict(sd15_state)
    state[key] = state[key].clone()
    state[key][0, 0] = float("nan")
    report = check_lora_file(write(tmp_path, state))
    assert not report.ok and any("NaN" in p and key in p for p in report.problems)
    assert not report.ignored


def test_all_zero_up_weights_are_an_untrained_file(sd15_state, tmp_path):
    state = {k: torch.zeros_like(v) if k.endswith("lora_up.weight") else v for k, v in sd15_state.items()}
    report = check_lora_file(write(tmp_path, state))
    assert any("every lora_up weight is zero" in p for p in report.problems)
    assert "every lora_up is zero" in report.notes[0]


def test_missing_alpha_and_mixed_dtypes_are_problems(sd15_state, tmp_path):
    name = "lora_te_text_model_encoder_layers_3_self_attn_q_proj"
    no_alpha = {k: v for k, v in sd15_state.items() if k != f"{name}.alpha"}
    assert any("no .alpha" in p and name in p for p in check_lora_file(write(tmp_path, no_alpha)).problems)
    mixed = dict(sd15_state, **{f"{name}.lora_up.weight": sd15_state[f"{name}.lora_up.weight"].half()})
    assert any("mixed weight dtypes" in p for p in check_lora_file(write(tmp_path, mixed)).problems)


def test_sd1_text_encoder_prefix_on_sdxl_only_a1111_ignores(tmp_path):
    state = renamed(spec_state("sdxl.txt"), "lora_te1_", "lora_te_")
    verdicts = check_lora_file(write(tmp_path, state, "sdxl_base_v1-0")).verdicts
    assert verdicts["ComfyUI"].all_applied and verdicts["diffusers"].all_applied
    assert len(verdicts["A1111"].ignored) == 72 * 3
    assert "lora_te_" in next(iter(verdicts["A1111"].ignored.values()))


def test_sdxl_prefix_on_sd2_only_comfyui_takes(tmp_path):
    state = renamed(spec_state("sd2.txt"), "lora_te_", "lora_te1_")
    verdicts = check_lora_file(write(tmp_path, state, "sd_v2")).verdicts
    assert verdicts["ComfyUI"].all_applied
    assert len(verdicts["A1111"].ignored) == 138 * 3 and "only to lora_te_" in next(iter(verdicts["A1111"].ignored.values()))


def test_diffusers_style_sdxl_names_lose_only_the_first_upsampler_in_a1111(tmp_path):
    """A1111's upsampler rule puts up_blocks.0's upsampler at output_blocks.2.1, where SDXL has attention."""
    to_diffusers = {}
    for line in (SPEC_DIR / "sdxl-diffusers-map.txt").read_text(encoding="utf-8").splitlines():
        name, path = line.split()[:2]
        to_diffusers[name] = "lora_unet_" + path.replace(".", "_")
    state = {}
    for key, tensor in spec_state("sdxl-conv.txt").items():
        name, suffix = key.split(".", 1)
        state[f"{to_diffusers.get(name, name)}.{suffix}"] = tensor
    verdicts = check_lora_file(write(tmp_path, state, "sdxl_base_v1-0")).verdicts
    assert verdicts["ComfyUI"].all_applied and verdicts["diffusers"].all_applied
    assert {k.split(".")[0] for k in verdicts["A1111"].ignored} == {"lora_unet_up_blocks_0_upsamplers_0_conv"}


def test_openclip_attention_needs_all_four_parts_in_a1111(tmp_path):
    state = {k: v for k, v in spec_state("sd2.txt").items()
             if not k.startswith("lora_te_text_model_encoder_layers_0_self_attn_v_proj")}
    verdicts = check_lora_file(write(tmp_path, state, "sd_v2")).verdicts
    assert verdicts["ComfyUI"].all_applied and verdicts["diffusers"].all_applied
    assert {k.split(".")[0] for k in verdicts["A1111"].ignored} == {
        f"lora_te_text_model_encoder_layers_0_self_attn_{p}" for p in ("q_proj", "k_proj", "out_proj")}


def test_loha_and_dora_files(sd15_state, tmp_path):
    name = "lora_unet_mid_block_attentions_0_proj_out"
    loha = {f"{name}.{part}": torch.ones(2, 1280) for part in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    report = check_lora_file(write(tmp_path, dict(loha, **{f"{name}.alpha": torch.tensor(1.0)})))
    assert report.verdicts["ComfyUI"].all_applied and report.verdicts["A1111"].all_applied
    assert "whole load fails" in report.verdicts["diffusers"].fails
    assert "loha" in report.notes[0] and "rank 2" in report.notes[0]
    assert not report.ok and report.ok_for_webuis  # made for ComfyUI / A1111, where every key applies
    assert report.summary_lines()[-1].startswith("OK for ComfyUI / Forge and A1111")
    dora = dict(sd15_state, **{f"{name}.dora_scale": torch.ones(1280, 1)})
    report = check_lora_file(write(tmp_path, dora))
    assert set(report.ignored) == {f"{name}.dora_scale"} and "diffusers" in report.ignored[f"{name}.dora_scale"]
    assert "+dora" in report.notes[-1]


# -- diffusers' own conversion confirms its rules ----------------------------------------------------------------


def _diffusers_module_paths(names: list[str]) -> set[str]:
    """What diffusers' own conversion makes of kohya names: the module paths its peft loading targets."""
    conversion = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    state = {f"{n}.{s}": torch.zeros(1) for n in names for s in ("lora_down.weight", "lora_up.weight")}
    state = conversion._maybe_map_sgm_blocks_to_diffusers(state, SimpleNamespace(layers_per_block=2))
    converted, _ = conversion._convert_non_diffusers_lora_to_diffusers(state)
    paths = set()
    for key in converted:
        if ".down." not in key:
            continue
        path = key.split(".", 1)[1]
        for tail in (".lora.down.weight", "_lora.down.weight", ".lora_linear_layer.down.weight"):
            path = path.removesuffix(tail)
        path = path.replace(".processor.", ".")
        if ".self_attn." in path:
            path = path.replace(".to_out", ".out_proj").replace(".to_", ".").replace(".q", ".q_proj") \
                .replace(".k", ".k_proj").replace(".v", ".v_proj")
        else:
            path = path.replace(".to_out", ".to_out.0")
        paths.add(path)
    return paths


@pytest.mark.parametrize("case,architecture", [("sd15-conv.txt", "sd15"), ("sd2.txt", "sd2-512"),
                                               ("sdxl-conv.txt", "sdxl")])
def test_diffusers_own_conversion_lands_where_our_rules_say(case, architecture):
    layers = consumers.architecture_layers(architecture)
    names = [row[0] for row in spec_rows(case)]
    expected = set()
    for name in names:
        converted = consumers.diffusers_sgm_name(name, layers.layers_per_block)
        expected.add(layers.accepted("diffusers")[converted].path)
    assert _diffusers_module_paths(names) == expected
    all_paths = set(layers.unet) | set().union(*layers.text)
    assert expected <= all_paths


def test_diffusers_own_conversion_misses_te_names_without_text_model():
    layers = consumers.architecture_layers("sd15")
    names = [n.replace("lora_te_text_model_", "lora_te_") for n, *_ in spec_rows("sd15.txt") if n.startswith("lora_te_")]
    assert not _diffusers_module_paths(names) & set(layers.text[0])


# -- --base, the commands ----------------------------------------------------------------------------------------


def test_base_model_layers_are_used(tiny_sd1, tiny_sd1_dir, tmp_path):
    network = LoRANetwork([tiny_sd1["text_encoder"]], tiny_sd1["unet"], rank=2, alpha=1)
    for module in network.lora_modules():
        torch.nn.init.normal_(module.lora_up.weight)
    path = tmp_path / "tiny.safetensors"
    network.save_weights(path)
    report = check_lora_file(path, base=str(tiny_sd1_dir))
    assert report.ok and report.family_source == "--base" and report.architecture.startswith("--base")
    wrong = check_lora_file(write(tmp_path, spec_state("sd15.txt")), base=str(tiny_sd1_dir))
    assert any("do not fit the layer" in p for p in wrong.problems)


def test_check_lora_command(sd15_state, tmp_path, capsys):
    good = write(tmp_path, sd15_state, name="good.safetensors")
    assert check_lora.main([str(good)]) == 0
    assert "OK: every key" in capsys.readouterr().out
    bad = write(tmp_path, renamed(sd15_state, "lora_te_text_model_", "lora_te_"), name="bad.safetensors")
    assert check_lora.main([str(bad), "--json"]) == 1
    answer = json.loads(capsys.readouterr().out)
    assert answer["ok"] is False and not answer["consumers"]["ComfyUI"]["all_applied"]
    assert len(answer["ignored"]) == 72 * 3
    with pytest.raises(ConfigError, match="not found"):
        check_lora.main([str(tmp_path / "missing.safetensors")])


def test_show_metadata_decodes_and_summarises(tmp_path, capsys):
    tags = {"10_cat": {f"tag{i}": i for i in range(100)}}
    metadata = {"ss_network_dim": "4", "ss_tag_frequency": json.dumps(tags),
                "ss_dataset_dirs": json.dumps({"10_cat": {"n_repeats": 10, "img_count": 12}}),
                "modelspec.title": "my cat"}
    path = tmp_path / "meta.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata=metadata)
    assert check_lora.show_metadata_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "ss_network_dim" in out and "my cat" in out
    assert "100 tags, top: tag99 (99)" in out and "12 images x 10 repeats" in out and "tag3" not in out
    check_lora.show_metadata_main([str(path), "--full"])
    assert '"tag3": 3' in capsys.readouterr().out
    check_lora.show_metadata_main([str(path), "--json"])
    decoded = json.loads(capsys.readouterr().out)
    assert decoded["ss_tag_frequency"] == tags and decoded["ss_network_dim"] == "4"
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 20)
    with pytest.raises(ConfigError, match="cannot read"):
        check_lora.show_metadata_main([str(tmp_path / "broken.safetensors")])
