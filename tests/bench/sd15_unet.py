# sd15_unet.py: the tensor names and shapes of the Stable Diffusion 1.5 UNet
# as diffusers stores it (UNet2DConditionModel: block_out_channels 320, 640,
# 1280, 1280; two resnets a down block, three an up block; cross attention
# of width 768), for benchmarks on a model of the real size (859.5 M
# parameters) that the project generates itself.
#
# SPDX-License-Identifier: LGPL-2.1-or-later


def resnet(prefix, cin, cout):
    out = [(prefix + "norm1.weight", (cin,)), (prefix + "norm1.bias", (cin,)),
           (prefix + "conv1.weight", (cout, cin, 3, 3)), (prefix + "conv1.bias", (cout,)),
           (prefix + "time_emb_proj.weight", (cout, 1280)), (prefix + "time_emb_proj.bias", (cout,)),
           (prefix + "norm2.weight", (cout,)), (prefix + "norm2.bias", (cout,)),
           (prefix + "conv2.weight", (cout, cout, 3, 3)), (prefix + "conv2.bias", (cout,))]
    if cin != cout:
        out += [(prefix + "conv_shortcut.weight", (cout, cin, 1, 1)), (prefix + "conv_shortcut.bias", (cout,))]
    return out


def attention(prefix, c):
    t = prefix + "transformer_blocks.0."
    out = [(prefix + "norm.weight", (c,)), (prefix + "norm.bias", (c,)),
           (prefix + "proj_in.weight", (c, c, 1, 1)), (prefix + "proj_in.bias", (c,))]
    for n in ("norm1", "norm2", "norm3"):
        out += [(t + n + ".weight", (c,)), (t + n + ".bias", (c,))]
    for attn, kv in (("attn1", c), ("attn2", 768)):
        out += [(t + attn + ".to_q.weight", (c, c)), (t + attn + ".to_k.weight", (c, kv)),
                (t + attn + ".to_v.weight", (c, kv)),
                (t + attn + ".to_out.0.weight", (c, c)), (t + attn + ".to_out.0.bias", (c,))]
    out += [(t + "ff.net.0.proj.weight", (8 * c, c)), (t + "ff.net.0.proj.bias", (8 * c,)),
            (t + "ff.net.2.weight", (c, 4 * c)), (t + "ff.net.2.bias", (c,)),
            (prefix + "proj_out.weight", (c, c, 1, 1)), (prefix + "proj_out.bias", (c,))]
    return out


def layout():
    ch = (320, 640, 1280, 1280)
    out = [("conv_in.weight", (320, 4, 3, 3)), ("conv_in.bias", (320,)),
           ("time_embedding.linear_1.weight", (1280, 320)), ("time_embedding.linear_1.bias", (1280,)),
           ("time_embedding.linear_2.weight", (1280, 1280)), ("time_embedding.linear_2.bias", (1280,))]
    cin = 320
    for b, c in enumerate(ch):
        p = "down_blocks.%d." % b
        for j in range(2):
            out += resnet(p + "resnets.%d." % j, cin if j == 0 else c, c)
            if b < 3:
                out += attention(p + "attentions.%d." % j, c)
        if b < 3:
            out += [(p + "downsamplers.0.conv.weight", (c, c, 3, 3)), (p + "downsamplers.0.conv.bias", (c,))]
        cin = c
    out += resnet("mid_block.resnets.0.", 1280, 1280) + attention("mid_block.attentions.0.", 1280)
    out += resnet("mid_block.resnets.1.", 1280, 1280)
    rev = ch[::-1]
    prev = 1280
    for b, c in enumerate(rev):
        p = "up_blocks.%d." % b
        skip_in = rev[min(b + 1, 3)]
        for j in range(3):
            res_skip = skip_in if j == 2 else c
            res_in = prev if j == 0 else c
            out += resnet(p + "resnets.%d." % j, res_in + res_skip, c)
            if b > 0:
                out += attention(p + "attentions.%d." % j, c)
        if b < 3:
            out += [(p + "upsamplers.0.conv.weight", (c, c, 3, 3)), (p + "upsamplers.0.conv.bias", (c,))]
        prev = c
    out += [("conv_norm_out.weight", (320,)), ("conv_norm_out.bias", (320,)),
            ("conv_out.weight", (4, 320, 3, 3)), ("conv_out.bias", (4,))]
    return out


if __name__ == "__main__":
    import math
    print(len(layout()), sum(math.prod(s) for _, s in layout()))
