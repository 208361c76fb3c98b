#!/usr/bin/python3
# test_rename_metadata.py: `rename rules=...` and the metadata that names modules
#
# diffusers' save_lora_weights stores each component's LoraConfig.to_dict()
# in the safetensors metadata as `lora_adapter_metadata`, flattened by
# _pack_dict_with_prefix (`transformer.r`, `transformer.rank_pattern`, ...)
# and written with json.dumps(indent=2, sort_keys=True). load_lora_adapter
# builds the LoraConfig from it (_create_lora_config) instead of reading the
# factors' shapes, so after a regex rename its rank_pattern / alpha_pattern /
# target_modules must name the renamed modules, or diffusers builds layers of
# the wrong rank (a size mismatch) or the wrong scale. The loading rule is
# test_lora_loader_rules.diffusers_load (load_lora_adapter + PEFT's
# inject_adapter_in_model, get_pattern_key, check_target_module_exists).
#
# - rules the pattern keys can follow: the keys are renamed, the file loads
#   in diffusers with every module's update scale * B @ A as before;
# - a pattern that is a regular expression, with scales other than 1: the
#   rename fails naming the entry, and writes nothing;
# - the same with every scale 1: the entry is dropped with `lpipe: warning:`
#   naming it, and diffusers, reading the shapes, loads the same updates;
# - kohya's sshs_* hashes are dropped (they hash the bytes in name order),
#   its ss_network_dim stays.
#
# SPDX-License-Identifier: LGPL-2.1-or-later

import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_lora_loader_rules as rules  # noqa: E402  (diffusers' and PEFT's loading rules)
from safetensors_numpy import read_st, write_st  # noqa: E402

LPIPE = os.environ["LPIPE"]
FAILURES = []
# updates compared in f64 from F32 factors
TOL = 2.0**-24 * 16

# a Flux-like transformer: module -> [out, in]
MODEL = {"transformer_blocks.%d.attn.%s" % (b, p): [16, 16] for b in range(2) for p in ("to_q", "to_k")}
MODEL["proj_out"] = [8, 16]
RULE = r"transformer_blocks\.=blocks."


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        FAILURES.append(what)


def renamed_model():
    return {k.replace("transformer_blocks.", "blocks."): v for k, v in MODEL.items()}


def write_diffusers(name, config, ranks):
    """A diffusers LoRA with its lora_adapter_metadata, as save_lora_weights writes it."""
    full = {"r": 4, "lora_alpha": 8, "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False,
            "use_dora": False, "target_modules": sorted(MODEL), "peft_type": "LORA", "bias": "none",
            "lora_dropout": 0.0, "init_lora_weights": True, "fan_in_fan_out": False, "task_type": None}
    full.update(config)
    rng = np.random.default_rng(len(name))
    t = {}
    for m, (out, inn) in sorted(MODEL.items()):
        t["transformer.%s.lora_A.weight" % m] = rng.standard_normal((ranks.get(m, full["r"]), inn)) * 0.1
        t["transformer.%s.lora_B.weight" % m] = rng.standard_normal((out, ranks.get(m, full["r"]))) * 0.1
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps(
        {"transformer." + k: v for k, v in full.items()}, indent=2, sort_keys=True)}
    return write_st(rules.path(name), t, meta)


def rename(src, dst, rule=RULE):
    return subprocess.run([LPIPE, "launch", "safetensors-source", "location=" + src, "!", "rename",
                           "rules=" + rule, "!", "safetensors-sink", "location=" + dst],
                          capture_output=True, text=True)


def same_updates(before, after, label):
    """diffusers' updates of the renamed file are those of the original, module by module"""
    moved = {k.replace("transformer_blocks.", "blocks."): v for k, v in before.items()}
    check(sorted(moved) == sorted(after), "%s: every module loads (%d)" % (label, len(after)))
    worst = max(np.max(np.abs(moved[m] - after[m])) / max(np.max(np.abs(moved[m])), 1e-30)
                for m in after if m in moved) if after else 1.0
    check(worst <= TOL, "%s: updates equal to the original's (worst rel. %.2g)" % (label, worst))


def test_keys_follow():
    # as diffusers' get_peft_kwargs writes patterns: the module names, unanchored
    src = write_diffusers("keys.safetensors",
                          {"rank_pattern": {"transformer_blocks.1.attn.to_k": 2},
                           "alpha_pattern": {"transformer_blocks.1.attn.to_k": 6, "^proj_out": 1}},
                          {"transformer_blocks.1.attn.to_k": 2})
    before, unloaded = rules.diffusers_load(src, MODEL, "transformer")
    check(not unloaded and len(before) == len(MODEL), "keys: the input loads whole in diffusers")
    dst = rules.path("keys-renamed.safetensors")
    p = rename(src, dst)
    check(p.returncode == 0 and "warning" not in p.stderr, "keys: the rename succeeds quietly: " + p.stderr)
    meta = json.loads(read_st(dst)[1]["lora_adapter_metadata"])
    check(meta["transformer.rank_pattern"] == {"blocks.1.attn.to_k": 2}
          and meta["transformer.alpha_pattern"] == {"blocks.1.attn.to_k": 6, "^proj_out": 1},
          "keys: rank_pattern and alpha_pattern keys renamed by the rules: %s" % meta)
    check(sorted(meta["transformer.target_modules"]) == sorted(renamed_model()),
          "keys: target_modules renamed by the rules")
    check(list(meta) == sorted(meta), "keys: the entries sorted, as json.dumps(sort_keys=True) writes them")
    try:
        after, unloaded = rules.diffusers_load(dst, renamed_model(), "transformer")
    except RuntimeError as e:
        check(False, "keys: the renamed file loads in diffusers: %s" % e)
        return
    check(not unloaded, "keys: no key left unloaded")
    same_updates(before, after, "keys")


def test_regex_pattern_scaled():
    # a pattern written by hand as a regular expression: no rule can follow it
    src = write_diffusers("regex.safetensors", {"rank_pattern": {r"transformer_blocks\.1\..*to_k": 2}},
                          {"transformer_blocks.1.attn.to_k": 2})
    rules.diffusers_load(src, MODEL, "transformer")
    dst = rules.path("regex-renamed.safetensors")
    p = rename(src, dst)
    check(p.returncode != 0 and "lora_adapter_metadata" in p.stderr and "rank_pattern" in p.stderr
          and "rename" in p.stderr, "regex: lora_alpha != r, the rename fails naming the entry: " + p.stderr)
    check(not os.path.exists(dst), "regex: ... and writes nothing")


def test_regex_pattern_unscaled():
    # lora_alpha == r for every module (scale 1): dropping the entry loses nothing
    src = write_diffusers("unscaled.safetensors",
                          {"lora_alpha": 4, "rank_pattern": {r"transformer_blocks\.1\..*to_k": 2},
                           "alpha_pattern": {r"transformer_blocks\.1\..*to_k": 2}},
                          {"transformer_blocks.1.attn.to_k": 2})
    before, _ = rules.diffusers_load(src, MODEL, "transformer")
    dst = rules.path("unscaled-renamed.safetensors")
    p = rename(src, dst)
    check(p.returncode == 0 and "lpipe: warning:" in p.stderr and "lora_adapter_metadata" in p.stderr,
          "unscaled: the entry is dropped with a warning naming it: " + p.stderr)
    check("lora_adapter_metadata" not in read_st(dst)[1], "unscaled: no lora_adapter_metadata written")
    after, unloaded = rules.diffusers_load(dst, renamed_model(), "transformer")
    check(not unloaded, "unscaled: no key left unloaded")
    same_updates(before, after, "unscaled")


def test_kohya_hashes():
    src = rules.path("kohya.safetensors")
    rng = np.random.default_rng(1)
    t = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": rng.standard_normal((4, 8)),
         "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": rng.standard_normal((8, 4)),
         "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": np.float32(4)}
    write_st(src, t, {"ss_network_dim": "4", "ss_network_alpha": "4.0", "sshs_model_hash": "ab" * 32,
                      "sshs_legacy_hash": "cd" * 4})
    dst = rules.path("kohya-renamed.safetensors")
    p = rename(src, dst, "attentions_0_proj_in=attentions_0_proj_out")
    meta = read_st(dst)[1] if p.returncode == 0 else {}
    check(p.returncode == 0 and "sshs_model_hash" not in meta and "sshs_legacy_hash" not in meta
          and meta.get("ss_network_dim") == "4", "kohya: sshs_* hashes dropped, ss_network_dim kept: %s" % meta)


def main():
    for test in (test_keys_follow, test_regex_pattern_scaled, test_regex_pattern_unscaled, test_kohya_hashes):
        print("#", test.__name__)
        test()
    if FAILURES:
        print("%d failures" % len(FAILURES))
        sys.exit(1)


if __name__ == "__main__":
    main()
