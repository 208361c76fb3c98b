#!/usr/bin/python3
# test_rename_adapter_config.py: `rename` and the PEFT adapter_config.json beside the output
#
# PEFT's save_pretrained writes adapter_model.safetensors and beside it
# adapter_config.json, LoraConfig.to_dict() as json.dumps(indent=2,
# sort_keys=True). PeftModel.from_pretrained builds a LoRA layer on every
# module check_target_module_exists takes (target_modules: a list of names
# or name ends, or a regular expression for the whole name; exclude_modules,
# layers_to_transform) with r and lora_alpha from rank_pattern /
# alpha_pattern by get_pattern_key, then copies the factors in. After a
# rename the config must name the renamed modules, or PEFT builds no layer
# for them (their keys are left unloaded) or one of the wrong rank or
# scale. The loading rule is test_lora_loader_rules.peft_inject, with
# check_target_module_exists, get_pattern_key and
# _maybe_include_all_linear_layers re-implemented from PEFT.
#
# - rules the config can follow (list entries and pattern keys that are
#   module names): the keys are renamed, and the config beside the output
#   targets exactly the output's modules, each with the update
#   scale * B @ A it had;
# - a regex target_modules the renamed modules still match is kept as is;
#   one they no longer match, a regex pattern key, a layers_to_transform
#   index the rules move: with scales other than 1 the rename fails naming
#   adapter_config.json and the entry, and writes nothing; with every scale 1
#   the config is not written, with `lpipe: warning:`;
# - rules that leave PEFT's names, and preset=peft-to-kohya: no PEFT config
#   beside the output (a warning says so); kohya's loader reads the same
#   updates from the .alpha tensors;
# - `samples`: every PEFT file of lora-samples renamed the same way (exit 77
#   when ../shared/lora-samples is absent).
#
# SPDX-License-Identifier: LGPL-2.1-or-later

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_lora_loader_rules as rules  # noqa: E402  (PEFT's and kohya's loading rules)
from safetensors_numpy import read_st, write_st  # noqa: E402

LPIPE = os.environ["LPIPE"]
FAILURES = []
# updates compared in f64 from F32 (or F16) factors that the rename copies bit for bit
TOL = 2.0**-24 * 16
PREFIX = "base_model.model."

# a Llama-like model: module -> [out, in]; k_proj and up_proj are trained by no test
MODEL = {"model.layers.%d.self_attn.%s" % (l, p): [16, 16] for l in range(2) for p in ("q_proj", "k_proj", "v_proj")}
MODEL.update({"model.layers.%d.mlp.%s" % (l, p): [8, 16] for l in range(2) for p in ("down_proj", "up_proj")})
TRAINED = sorted(m for m in MODEL if m.endswith(("q_proj", "v_proj", "down_proj")))


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        FAILURES.append(what)


def lora_config(**fields):
    """LoraConfig.to_dict() as PEFT 0.17's save_pretrained writes it (the
    fields of lora-samples' adapter_config.json files)"""
    config = {"alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "Qwen/Qwen2.5-0.5B",
              "bias": "none", "corda_config": None, "eva_config": None, "exclude_modules": None,
              "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
              "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
              "loftq_config": {}, "lora_alpha": 16, "lora_bias": False, "lora_dropout": 0.05,
              "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
              "peft_type": "LORA", "qalora_group_size": 16, "r": 4, "rank_pattern": {}, "revision": None,
              "target_modules": ["q_proj", "v_proj", "down_proj"], "target_parameters": None,
              "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_dora": False,
              "use_qalora": False, "use_rslora": False}
    config.update(fields)
    return config


def write_peft(name, config, modules=TRAINED):
    """A PEFT folder as save_pretrained writes it, ranks as the config gives them"""
    folder = rules.path(name)
    os.makedirs(folder)
    rng = np.random.default_rng(len(name))
    t = {}
    for m in modules:
        out, inn = MODEL[m]
        r, _ = rules.peft_scale(config, m)
        t[PREFIX + m + ".lora_A.weight"] = (rng.standard_normal((r, inn)) * 0.1).astype(np.float32)
        t[PREFIX + m + ".lora_B.weight"] = (rng.standard_normal((out, r)) * 0.1).astype(np.float32)
    write_st(os.path.join(folder, "adapter_model.safetensors"), t, {"format": "pt"})
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return folder


def rename(src, dst, stage):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    return subprocess.run([LPIPE, "launch", "safetensors-source", "location=" + src, "!", "rename"] + stage
                          + ["!", "safetensors-sink", "location=" + dst], capture_output=True, text=True)


def rule_text(rule_list):
    return ",".join("%s=%s" % r for r in rule_list)


def apply_rules(rule_list, name):
    """What the rules make of a module's name: GRegex and Python's re agree on these"""
    full = PREFIX + name + ".lora_A.weight"
    for pattern, replacement in rule_list:
        full = re.sub(pattern, replacement, full)
    return full[len(PREFIX):-len(".lora_A.weight")]


def peft_load(folder, model):
    """PeftModel.from_pretrained on a base model of @model's modules: the
    config read, the state dict's `base_model.model.` taken off (keys
    without it are unexpected there), peft_inject. Returns the config, the
    modules it targets, the updates and the keys no layer took."""
    with open(os.path.join(folder, "adapter_config.json")) as f:
        config = json.load(f)
    sd, _ = read_st(os.path.join(folder, "adapter_model.safetensors"))
    outside = [k for k in sd if not k.startswith(PREFIX)]
    sd = {k[len(PREFIX):]: v.astype(np.float64) for k, v in sd.items() if k.startswith(PREFIX)}
    full = rules.maybe_include_all_linear_layers(config, model)
    targets = sorted(m for m in model if rules.check_target_module_exists(full, m))
    updates, unloaded = rules.peft_inject(config, model, sd)
    return config, targets, updates, unloaded + outside


def same_load(src, dst, rule_list, label, model=MODEL):
    """The config beside the output targets exactly the output's modules
    (no key left unloaded, no layer without factors), each with the scale
    and update of the module it was"""
    config, _, before, _ = peft_load(src, model)
    renamed_model = {apply_rules(rule_list, m): v for m, v in model.items()}
    try:
        new_config, targets, after, unloaded = peft_load(dst, renamed_model)
    except (OSError, RuntimeError) as e:
        check(False, "%s: the output loads in PEFT: %s" % (label, e))
        return None
    sd, _ = read_st(os.path.join(dst, "adapter_model.safetensors"))
    modules = sorted(k[len(PREFIX):-len(".lora_A.weight")] for k in sd if k.endswith(".lora_A.weight"))
    check(not unloaded, "%s: no key left unloaded: %s" % (label, unloaded[:3]))
    check(targets == modules, "%s: target_modules selects exactly the output's %d modules (%s)"
          % (label, len(modules), sorted(set(targets) ^ set(modules))[:3]))
    moved = {apply_rules(rule_list, m): m for m in before}
    check(sorted(moved) == sorted(after), "%s: every module loads (%d)" % (label, len(after)))
    scales = [(rules.peft_scale(new_config, m)[1], rules.peft_scale(config, moved[m])[1]) for m in after if m in moved]
    check(all(a == b for a, b in scales), "%s: every module's scale as before (%s)"
          % (label, sorted(set(scales))[:3]))
    worst = max([np.max(np.abs(after[m] - before[moved[m]])) / max(np.max(np.abs(before[moved[m]])), 1e-30)
                 for m in after if m in moved] or [1.0])
    check(worst <= TOL, "%s: updates equal to the original's (worst rel. %.2g)" % (label, worst))
    check(list(new_config) == sorted(new_config), "%s: the config's keys sorted, as save_pretrained writes them"
          % label)
    return new_config


def test_names_follow():
    # patterns as a user writes them for PEFT: module names, anchored or not
    config = lora_config(rank_pattern={"layers.1.self_attn.v_proj": 2},
                         alpha_pattern={"layers.1.self_attn.v_proj": 6, "^model.layers.0.mlp.down_proj": 4})
    src = write_peft("follow", config)
    # the second rule needs the part before the entry `q_proj`: the entry
    # becomes the end of the names it selected
    rule_list = [(r"\.layers\.", ".blocks."), (r"self_attn\.q_proj", "self_attn.query")]
    dst = rules.path("follow-out")
    p = rename(os.path.join(src, "adapter_model.safetensors"), os.path.join(dst, "adapter_model.safetensors"),
               ["rules=" + rule_text(rule_list)])
    check(p.returncode == 0 and "warning" not in p.stderr, "follow: the rename succeeds quietly: " + p.stderr)
    new_config = same_load(src, dst, rule_list, "follow")
    if new_config is None:
        return
    check(new_config["target_modules"] == ["query", "v_proj", "down_proj"],
          "follow: target_modules renamed: %s" % new_config["target_modules"])
    check(new_config["rank_pattern"] == {"blocks.1.self_attn.v_proj": 2}
          and new_config["alpha_pattern"] == {"blocks.1.self_attn.v_proj": 6, "^model.blocks.0.mlp.down_proj": 4},
          "follow: rank_pattern and alpha_pattern keys renamed: %s %s"
          % (new_config["rank_pattern"], new_config["alpha_pattern"]))
    check({k: v for k, v in new_config.items() if k not in ("target_modules", "rank_pattern", "alpha_pattern")}
          == {k: v for k, v in config.items() if k not in ("target_modules", "rank_pattern", "alpha_pattern")},
          "follow: every other field as it was")


def test_regex_target_kept():
    # a regular expression the renamed modules still match whole
    config = lora_config(target_modules=r".*\.(q_proj|v_proj|down_proj)")
    src = write_peft("regex-kept", config)
    rule_list = [(r"\.layers\.", ".blocks.")]
    dst = rules.path("regex-kept-out")
    p = rename(os.path.join(src, "adapter_model.safetensors"), os.path.join(dst, "adapter_model.safetensors"),
               ["rules=" + rule_text(rule_list)])
    check(p.returncode == 0 and "warning" not in p.stderr, "regex-kept: the rename succeeds quietly: " + p.stderr)
    new_config = same_load(src, dst, rule_list, "regex-kept")
    check(new_config is not None and new_config["target_modules"] == config["target_modules"],
          "regex-kept: target_modules kept as written")


def test_all_linear():
    # `all-linear` names the model's linear layers, whatever they are called
    config = lora_config(target_modules="all-linear")
    src = write_peft("all-linear", config, sorted(MODEL))
    rule_list = [(r"\.layers\.", ".blocks.")]
    dst = rules.path("all-linear-out")
    p = rename(os.path.join(src, "adapter_model.safetensors"), os.path.join(dst, "adapter_model.safetensors"),
               ["rules=" + rule_text(rule_list)])
    check(p.returncode == 0 and "warning" not in p.stderr, "all-linear: the rename succeeds quietly: " + p.stderr)
    new_config = same_load(src, dst, rule_list, "all-linear")
    check(new_config is not None and new_config["target_modules"] == "all-linear", "all-linear: kept")


def test_exclude_follows():
    # all-linear but what exclude_modules names: its entries follow the rules
    # too, for the model's modules the file has no factors for
    config = lora_config(target_modules="all-linear", exclude_modules=["k_proj", "up_proj"])
    src = write_peft("exclude", config)
    rule_list = [(r"k_proj", "key"), (r"\.layers\.", ".blocks.")]
    dst = rules.path("exclude-out")
    p = rename(os.path.join(src, "adapter_model.safetensors"), os.path.join(dst, "adapter_model.safetensors"),
               ["rules=" + rule_text(rule_list)])
    check(p.returncode == 0 and "warning" not in p.stderr, "exclude: the rename succeeds quietly: " + p.stderr)
    new_config = same_load(src, dst, rule_list, "exclude")
    check(new_config is not None and new_config["exclude_modules"] == ["key", "up_proj"],
          "exclude: exclude_modules renamed: %s" % (new_config or {}).get("exclude_modules"))


def refused(label, config, rule_list, what, modules=TRAINED):
    """scales other than 1: the rename fails naming the config and @what, writes nothing"""
    src = write_peft(label, config, modules)
    dst = rules.path(label + "-out")
    p = rename(os.path.join(src, "adapter_model.safetensors"), os.path.join(dst, "adapter_model.safetensors"),
               ["rules=" + rule_text(rule_list)])
    check(p.returncode != 0 and "adapter_config.json" in p.stderr and what in p.stderr and "rename" in p.stderr,
          "%s: lora_alpha != r, the rename fails naming adapter_config.json and %s: %s" % (label, what, p.stderr))
    check(not os.path.exists(dst) or os.listdir(dst) == [], "%s: ... and writes nothing" % label)


def test_refused():
    # a regex target_modules the renamed modules no longer match
    refused("regex-lost", lora_config(target_modules=r"model\.layers\.\d+\..*"), [(r"\.layers\.", ".blocks.")],
            "target_modules")
    # a rank_pattern key that is a regular expression: no rule can follow it
    refused("regex-key", lora_config(rank_pattern={r"layers\.1\..*v_proj": 2}), [(r"\.layers\.", ".blocks.")],
            "rank_pattern key 'layers\\.1\\..*v_proj'")
    # a list entry whose modules the rules rename apart
    refused("entry", lora_config(), [(r"layers\.0\.self_attn\.q_proj", "layers.0.self_attn.query")],
            "target_modules entry 'q_proj'")
    # layers_to_transform: the rules move the module to another layer index
    refused("layers", lora_config(layers_to_transform=[1], layers_pattern="layers"),
            [(r"\.layers\.1\.", ".layers.0.")], "target_modules",
            [m for m in TRAINED if ".1." in m])


def test_unscaled_dropped():
    # lora_alpha == r everywhere (scale 1): the factors alone give the updates
    config = lora_config(lora_alpha=4, target_modules=r"model\.layers\.\d+\..*")
    src = write_peft("unscaled", config)
    rule_list = [(r"\.layers\.", ".blocks.")]
    dst = rules.path("unscaled-out")
    p = rename(os.path.join(src, "adapter_model.safetensors"), os.path.join(dst, "adapter_model.safetensors"),
               ["rules=" + rule_text(rule_list)])
    check(p.returncode == 0 and "lpipe: warning:" in p.stderr and "adapter_config.json" in p.stderr
          and "target_modules" in p.stderr, "unscaled: the config is dropped with a warning naming it: " + p.stderr)
    check(sorted(os.listdir(dst)) == ["adapter_model.safetensors"], "unscaled: no adapter_config.json written")
    _, _, before, _ = peft_load(src, MODEL)
    sd, _ = read_st(os.path.join(dst, "adapter_model.safetensors"))
    worst = max(np.max(np.abs(sd[PREFIX + apply_rules(rule_list, m) + ".lora_B.weight"].astype(np.float64)
                              @ sd[PREFIX + apply_rules(rule_list, m) + ".lora_A.weight"] - before[m]))
                for m in before)
    check(worst <= TOL, "unscaled: B @ A (scale 1) of the output is each module's update (worst %.2g)" % worst)


def test_to_kohya():
    config = lora_config(alpha_pattern={"^model.layers.1.mlp.down_proj": 2})
    src = write_peft("kohya", config)
    _, _, before, _ = peft_load(src, MODEL)
    # rules that leave PEFT's names: the scales would be lost
    dst = rules.path("kohya-rules-out")
    p = rename(os.path.join(src, "adapter_model.safetensors"), os.path.join(dst, "adapter_model.safetensors"),
               ["rules=" + rule_text([(r"\.lora_A\.", ".lora_down."), (r"\.lora_B\.", ".lora_up.")])])
    check(p.returncode != 0 and "adapter_config.json" in p.stderr and "out of PEFT's names" in p.stderr,
          "kohya: rules to kohya suffixes fail, naming the config: " + p.stderr)
    check(not os.path.exists(dst) or os.listdir(dst) == [], "kohya: ... and write nothing")
    # the preset: the scales go to .alpha, the config stays behind
    dst = rules.path("kohya-out")
    out = os.path.join(dst, "adapter_model.safetensors")
    p = rename(os.path.join(src, "adapter_model.safetensors"), out, ["preset=peft-to-kohya"])
    check(p.returncode == 0 and "lpipe: warning:" in p.stderr and "adapter_config.json" in p.stderr
          and "kohya" in p.stderr, "kohya: peft-to-kohya says the PEFT config is not written: " + p.stderr)
    check(sorted(os.listdir(dst)) == ["adapter_model.safetensors"], "kohya: no adapter_config.json beside it")
    names = {"lora_unet_" + m.replace(".", "_"): m for m in MODEL}
    after, unloaded = rules.kohya_load(out, sorted(names))
    check(not unloaded and sorted(names[k] for k in after) == sorted(before), "kohya: every module loads in kohya")
    worst = max(np.max(np.abs(after[k] - before[names[k]])) / np.max(np.abs(before[names[k]])) for k in after)
    check(worst <= TOL, "kohya: kohya's alpha / dim gives every module's update (worst rel. %.2g)" % worst)


def test_samples():
    shared = os.environ.get("LPIPE_SHARED_DIR", "")
    files = sorted(glob.glob(os.path.join(shared, "lora-samples", "peft-*.safetensors")))
    if not files:
        print("SKIP ../shared/lora-samples is absent")
        sys.exit(77)
    for f in files:
        label = os.path.basename(f)[:-len(".safetensors")]
        folder = rules.path(label)
        os.makedirs(folder)
        shutil.copy(f, os.path.join(folder, "adapter_model.safetensors"))
        shutil.copy(f[:-len(".safetensors")] + ".adapter_config.json", os.path.join(folder, "adapter_config.json"))
        with open(os.path.join(folder, "adapter_config.json")) as c:
            first = json.load(c)["target_modules"][0]
        sd, _ = read_st(f)
        model = {k[len(PREFIX):-len(".lora_A.weight")]: None for k in sd if k.endswith(".lora_A.weight")}
        # a path part put before every module, and the first target renamed
        rule_list = [(r"^base_model\.model\.", PREFIX + "wrapped."),
                     (r"\.%s\.lora_" % re.escape(first), ".%s_renamed.lora_" % first)]
        dst = rules.path(label + "-out")
        p = rename(os.path.join(folder, "adapter_model.safetensors"), os.path.join(dst, "adapter_model.safetensors"),
                   ["rules=" + rule_text(rule_list)])
        check(p.returncode == 0 and "warning" not in p.stderr, "%s: the rename succeeds quietly: %s"
              % (label, p.stderr))
        new_config = same_load(folder, dst, rule_list, label, model)
        check(new_config is not None and new_config["target_modules"][0] == first + "_renamed",
              "%s: target_modules[0] renamed to %s_renamed" % (label, first))


def main():
    tests = [test_samples] if sys.argv[1:] == ["samples"] else \
        [test_names_follow, test_regex_target_kept, test_all_linear, test_exclude_follows, test_refused, test_unscaled_dropped,
         test_to_kohya]
    for test in tests:
        print("#", test.__name__)
        test()
    if FAILURES:
        print("%d failures" % len(FAILURES))
        sys.exit(1)


if __name__ == "__main__":
    main()
