#!/usr/bin/python3
# test_lora_dora.py: the rank stages' DoRA policy, against numpy
#
# DoRA (Liu et al. 2024) merges W' = m * (W0 + dW) / ||W0 + dW||, the norm of
# each output row (PEFT tuners/lora/dora.py DoraLinearLayer.get_weight_norm:
# torch.linalg.norm(W0 + scaling * B @ A, dim=1); the loader recomputes it),
# with m the trained magnitude: PEFT saves it as `<module>.lora_magnitude_vector`
# (save_and_load.py drops the DoraLayer's ".weight"), LyCORIS and kohya-style
# files as `<module>.dora_scale` [out, 1] (lycoris/modules/locon.py,
# wd_on_out=True). Files are written the way those tools write them.
#
# - dora=refuse (the default): exit 1, the message names the module, the
#   magnitude tensor and the reason (the base weight), nothing written;
# - dora=keep-magnitude: m is written unchanged and dW reduced at the
#   Eckart-Young optimum of dW, so for any base W0 the merged weight keeps the
#   row norms m exactly and each row's direction moves by at most
#   2 ||dW - dW'||_row / ||W0 + dW||_row (what docs/methods.md promises);
#   one `lpipe: warning:` line says so, and -q silences it.
#
# SPDX-License-Identifier: LGPL-2.1-or-later

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_lora_lycoris import FAILURES, check, read_st, stored, write_st  # noqa: E402

LPIPE = os.environ["LPIPE"]


def run(*args):
    return subprocess.run([LPIPE] + list(args), capture_output=True, text=True)


def reduce(stage, src, dst, *props, quiet=False):
    return run(*(["-q"] if quiet else []), "launch", "safetensors-source", "location=" + src, "!",
               stage, *props, "!", "safetensors-sink", "location=" + dst)


def check_merged(label, w0, dw, dw_new, m):
    """PEFT's merge of a DoRA module with the reduced update: the trained
    norms exactly, each row's direction within the documented bound"""
    merged = lambda d: m[:, None] * (w0 + d) / np.linalg.norm(w0 + d, axis=1, keepdims=True)
    new = merged(dw_new)
    check(np.allclose(np.linalg.norm(new, axis=1), m, rtol=1e-6, atol=0),
          "%s: the merged weight has the trained row norms m" % label)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    moved = np.linalg.norm(unit(w0 + dw_new) - unit(w0 + dw), axis=1)
    bound = 2 * np.linalg.norm(dw - dw_new, axis=1) / np.linalg.norm(w0 + dw, axis=1)
    check(np.all(moved <= bound * (1 + 1e-9) + 1e-12),
          "%s: each row's direction moves by at most 2 |dW - dW'| / |W0 + dW| (worst %.3g of %.3g)"
          % (label, np.max(moved / np.maximum(bound, 1e-300)), 1.0))
    print("%s: row norms kept, direction moved at most %.3g (bound %.3g)" % (label, moved.max(), bound.max()))


def main():
    tmp = tempfile.mkdtemp(prefix="lpipe-dora-")
    atexit.register(shutil.rmtree, tmp, True)
    f = lambda n: os.path.join(tmp, n)
    rng = np.random.default_rng(5)

    # ---- PEFT: lora_magnitude_vector beside lora_A/lora_B, use_dora ---------
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    v = "base_model.model.model.layers.0.self_attn.v_proj"
    out_f, in_f, r = 48, 64, 8
    t = {q + ".lora_A.weight": ("F32", stored(rng.standard_normal((r, in_f)) * 0.7 ** np.arange(r)[:, None], "F32")),
         q + ".lora_B.weight": ("F32", stored(rng.standard_normal((out_f, r)) * 0.1, "F32")),
         q + ".lora_magnitude_vector": ("F32", stored(1 + rng.random(out_f), "F32")),
         v + ".lora_A.weight": ("F32", stored(rng.standard_normal((r, in_f)), "F32")),
         v + ".lora_B.weight": ("F32", stored(rng.standard_normal((32, r)) * 0.1, "F32"))}
    src = f("adapter_model.safetensors")
    write_st(src, t, {"format": "pt"})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 16, "use_dora": True, "use_rslora": False,
              "target_modules": ["q_proj", "v_proj"], "rank_pattern": {}, "alpha_pattern": {},
              "base_model_name_or_path": "Qwen/Qwen2.5-0.5B", "task_type": "CAUSAL_LM"}
    with open(f("adapter_config.json"), "w") as fh:
        json.dump(config, fh, indent=2)

    for stage in ("lora-svd", "lora-project"):
        dst = f("refused-%s.safetensors" % stage)
        res = reduce(stage, src, dst, "rank=4")
        check(res.returncode == 1, "%s refuses DoRA by default (exit %d)" % (stage, res.returncode))
        for needle in ("stage 2 '%s'" % stage, "module " + q, q + ".lora_magnitude_vector",
                       "depends on the base weight W0", "dora=keep-magnitude"):
            check(needle in res.stderr, "%s refusal names %r: %s" % (stage, needle, res.stderr.strip()))
        check(not os.path.exists(dst), "%s: nothing written" % stage)

    dst = f("kept.safetensors")
    res = reduce("lora-svd", src, dst, "rank=4", "dora=keep-magnitude")
    check(res.returncode == 0, "lora-svd dora=keep-magnitude exits 0: %s" % res.stderr)
    warning = ("lpipe: warning: stage 2 'lora-svd': 1 DoRA modules (the first: %s): dora=keep-magnitude "
               "keeps their trained magnitudes, so the merged weights keep their norms exactly" % q)
    check(res.stderr.count(warning) == 1, "keep-magnitude is told once: %s" % res.stderr.strip())
    if res.returncode == 0:
        out, _ = read_st(dst)
        with open(f("adapter_config.json")) as fh:
            new_config = json.load(fh)
        check(np.array_equal(out[q + ".lora_magnitude_vector"][1], t[q + ".lora_magnitude_vector"][1]),
              "the magnitude is written unchanged")
        scale = config["lora_alpha"] / r
        a, b = t[q + ".lora_A.weight"][1], t[q + ".lora_B.weight"][1]
        dw = scale * b @ a
        k = out[q + ".lora_A.weight"][1].shape[0]
        new_scale = new_config["lora_alpha"] / new_config["r"]
        dw_new = new_scale * out[q + ".lora_B.weight"][1] @ out[q + ".lora_A.weight"][1]
        s = np.linalg.svd(dw, compute_uv=False)
        opt = np.sqrt(np.sum(s[k:] ** 2)) / np.linalg.norm(dw)
        err = np.linalg.norm(dw - dw_new) / np.linalg.norm(dw)
        check(k == 4 and abs(err - opt) <= 1e-4 + 4 * 2.0 ** -24,
              "the update is reduced at its optimum (k %d, error %.6g, optimum %.6g)" % (k, err, opt))
        check(new_config.get("use_dora") is True, "the PEFT config still says use_dora")
        # any base weight: one of the model's scale, one much smaller than dW
        for label, w0 in (("W0 ~ N(0, 1/in)", rng.standard_normal((out_f, in_f)) / np.sqrt(in_f)),
                          ("W0 small", 1e-3 * rng.standard_normal((out_f, in_f)))):
            check_merged("PEFT DoRA, " + label, w0, dw, dw_new, t[q + ".lora_magnitude_vector"][1])
        # restore the config for the next runs
        with open(f("adapter_config.json"), "w") as fh:
            json.dump(config, fh, indent=2)

    res = reduce("lora-svd", src, f("kept-q.safetensors"), "rank=4", "dora=keep-magnitude", quiet=True)
    check(res.returncode == 0 and res.stderr == "", "-q silences the DoRA warning (%r)" % res.stderr)
    with open(f("adapter_config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    res = reduce("lora-project", src, f("kept-p.safetensors"), "rank=4", "dora=keep-magnitude")
    check(res.returncode == 0 and "1 DoRA modules" in res.stderr,
          "lora-project dora=keep-magnitude exits 0 and says so: %s" % res.stderr.strip())
    if res.returncode == 0:
        out, _ = read_st(f("kept-p.safetensors"))
        check(np.array_equal(out[q + ".lora_magnitude_vector"][1], t[q + ".lora_magnitude_vector"][1]),
              "lora-project: the magnitude is written unchanged")
    os.unlink(f("adapter_config.json"))

    # ---- kohya/LyCORIS: dora_scale [out, 1] beside lora_down/lora_up/alpha ----
    c = "lora_unet_double_blocks_0_img_attn_proj"
    t = {c + ".lora_down.weight": ("BF16", stored(rng.standard_normal((8, 40)), "BF16")),
         c + ".lora_up.weight": ("BF16", stored(rng.standard_normal((24, 8)) * 0.05, "BF16")),
         c + ".alpha": ("BF16", np.array(4.0)),
         c + ".dora_scale": ("BF16", stored(1 + rng.random((24, 1)), "BF16"))}
    src = f("locon-dora.safetensors")
    write_st(src, t, {"ss_network_module": "lycoris.kohya", "ss_network_dim": "8", "ss_network_alpha": "4.0",
                      "ss_network_args": json.dumps({"algo": "locon", "dora_wd": "True"})})
    res = reduce("lora-svd", src, f("locon-refused.safetensors"), "rank=2")
    check(res.returncode == 1 and c + ".dora_scale" in res.stderr and "base weight" in res.stderr,
          "kohya DoRA refused by default: %s" % res.stderr.strip())
    res = reduce("lora-svd", src, f("locon-kept.safetensors"), "rank=2", "dora=keep-magnitude")
    check(res.returncode == 0, "kohya DoRA kept: %s" % res.stderr)
    if res.returncode == 0:
        out, _ = read_st(f("locon-kept.safetensors"))
        check(out[c + ".dora_scale"][0] == "BF16" and np.array_equal(out[c + ".dora_scale"][1], t[c + ".dora_scale"][1]),
              "kohya: dora_scale written unchanged, in bf16")
        check(out[c + ".lora_down.weight"][1].shape == (2, 40), "kohya: reduced to rank 2")

    # ---- LyCORIS LoKr with dora_scale: converted to a plain LoRA, m kept ---------
    a = "lora_unet_single_blocks_0_linear1"
    t = {a + ".lokr_w1": ("F32", stored(rng.standard_normal((4, 4)), "F32")),
         a + ".lokr_w2_a": ("F32", stored(rng.standard_normal((24, 4)), "F32")),
         a + ".lokr_w2_b": ("F32", stored(rng.standard_normal((4, 20)), "F32")),
         a + ".alpha": ("F16", np.array(2.0)),
         a + ".dora_scale": ("F32", stored(1 + rng.random((96, 1)), "F32"))}
    src = f("lokr-dora.safetensors")
    write_st(src, t, {"ss_network_module": "lycoris.kohya"})
    res = reduce("lora-svd", src, f("lokr-refused.safetensors"), "rank=3")
    check(res.returncode == 1 and a + ".dora_scale" in res.stderr and "dora=keep-magnitude" in res.stderr,
          "LoKr DoRA refused by default: %s" % res.stderr.strip())
    res = reduce("lora-svd", src, f("lokr-kept.safetensors"), "rank=3", "dora=keep-magnitude")
    check(res.returncode == 0 and "1 DoRA modules (the first: %s)" % a in res.stderr,
          "LoKr DoRA kept and told: %s" % res.stderr.strip())
    if res.returncode == 0:
        out, _ = read_st(f("lokr-kept.safetensors"))
        check(np.array_equal(out[a + ".dora_scale"][1], t[a + ".dora_scale"][1]), "LoKr: dora_scale unchanged")
        check(out[a + ".lora_down.weight"][1].shape == (3, 80) and not any(".lokr_" in n for n in out),
              "LoKr: a plain rank-3 LoRA beside it")

    if FAILURES:
        print("%d failure(s)" % len(FAILURES))
        sys.exit(1)
    print("all DoRA checks passed")


if __name__ == "__main__":
    main()
