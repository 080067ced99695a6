"""The token models on tiny configs: Decoder (packing masks, KV cache), sampling, Parti."""
import copy
import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.models import layers
from pipeline.models import parti as parti_module
from pipeline.models.decoder import Decoder, DecoderConfig, document_positions
from pipeline.models.parti import Parti, PartiConfig, collate, generate_image, training_loss
from pipeline.models.sampling import generate, guide, sample_loop, sample_next
from pipeline.tokenizers import vocab as vocab_module
from pipeline.tokenizers.config_checks import ConfigError


@pytest.fixture(scope="module")
def vocab():
    return vocab_module.build(text_size=50, image_codes=16, phonemes=("a", "b"), audio_codebooks=2,
                              audio_codebook_size=8)


def tiny_decoder(vocab, **overrides) -> Decoder:
    torch.manual_seed(0)
    return Decoder(DecoderConfig(**{"vocab_size": vocab.size, "n_layer": 2, "n_head": 2, "d_model": 32,
                                    **overrides})).eval()


def tiny_parti(vocab, **overrides) -> Parti:
    torch.manual_seed(0)
    return Parti(PartiConfig(**{"vocab_size": vocab.size, "encoder_layers": 2, "decoder_layers": 2, "n_head": 2,
                                "d_model": 32, **overrides})).eval()


def tokens(vocab, *shape, seed=1) -> torch.Tensor:
    return torch.randint(0, vocab.size, shape, generator=torch.Generator().manual_seed(seed))


# ---- Decoder ------------------------------------------------------------------------------------

def test_decoder_shapes_backward_and_tied_head(vocab):
    model = tiny_decoder(vocab).train()
    x = tokens(vocab, 2, 7)
    logits = model(x)
    assert logits.shape == (2, 7, vocab.size)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert model.head.weight is model.embed.weight
    untied = tiny_decoder(vocab, tie_embeddings=False)
    assert untied.head.weight is not untied.embed.weight
    n_params = lambda m: sum(p.numel() for p in m.parameters())
    assert n_params(untied) - n_params(model) == vocab.size * 32
    # residual projections: std 0.02 / sqrt(2 * n_layer), the rest 0.02
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(4), rel=0.1)
    assert model.blocks[1].attn.q.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_logits_at_chosen_positions_equal_the_full_forwards(vocab):
    model = tiny_decoder(vocab)
    x, doc_ids = tokens(vocab, 2, 9), torch.tensor([[0] * 4 + [1] * 5, [0] * 6 + [-1] * 3])
    only = torch.rand(2, 9, generator=torch.Generator().manual_seed(3)) < 0.5
    chosen = model(x, doc_ids, only=only)
    assert chosen.shape == (int(only.sum()), vocab.size)
    torch.testing.assert_close(chosen, model(x, doc_ids)[only], atol=1e-5, rtol=0)


def test_decoder_loss_is_the_mean_over_targets_and_per_task(vocab):
    from pipeline.models.train_tasks import TASK_NAMES, decoder_loss

    model = tiny_decoder(vocab)
    x, doc_ids = tokens(vocab, 2, 9), torch.tensor([[0] * 4 + [1] * 5, [0] * 6 + [-1] * 3])
    targets = torch.full((2, 9), -100)
    targets[0, 1:3], targets[0, 5:8], targets[1, 2:5] = x[0, 2:4], x[0, 6:9], x[1, 3:6]
    task_ids = torch.where(targets != -100, TASK_NAMES.index("t2i"), -1)
    task_ids[0, 5:8] = TASK_NAMES.index("i2t")
    loss, stats = decoder_loss(model, {"tokens": x, "doc_ids": doc_ids, "targets": targets, "task_ids": task_ids})
    with torch.no_grad():
        ce = F.cross_entropy(model(x, doc_ids).transpose(1, 2), targets, ignore_index=-100, reduction="none")
    torch.testing.assert_close(loss, ce[targets != -100].mean())
    assert stats["loss_i2t"] == pytest.approx(float(ce[0, 5:8].mean()), abs=1e-5)
    assert stats["loss_t2i"] == pytest.approx(float(torch.cat([ce[0, 1:3], ce[1, 2:5]]).mean()), abs=1e-5)
    assert stats["tokens"] == 15


def test_a_decoder_with_output_ranges_predicts_those_ids_alone(vocab):
    from pipeline.data.packing import task_ranges
    from pipeline.models.decoder import MASKED_LOGIT
    from pipeline.models.train_tasks import TASK_NAMES, decoder_loss

    ranges = task_ranges(vocab, ("t2i", "cm3:i2t"))
    text, image = vocab.range("text"), vocab.range("image")
    assert ranges == [(0, text.offset + text.size), (image.offset, image.offset + image.size)]  # specials+text merged
    model, full = tiny_decoder(vocab, output_ranges=tuple(ranges)), tiny_decoder(vocab)          # same weights
    outputs = torch.cat([torch.arange(lo, hi) for lo, hi in ranges])
    x, doc_ids = tokens(vocab, 2, 9), torch.tensor([[0] * 4 + [1] * 5, [0] * 6 + [-1] * 3])
    logits, unrestricted = model(x, doc_ids), full(x, doc_ids)
    kept = torch.zeros(vocab.size, dtype=torch.bool)
    kept[outputs] = True
    torch.testing.assert_close(logits[..., kept], unrestricted[..., kept])
    assert (logits[..., ~kept] == MASKED_LOGIT).all()                      # phonemes and audio: never predicted
    cache = model.new_cache()                                              # sampling sees the same restriction
    torch.testing.assert_close(torch.cat([model(x[:1, :4], cache=cache), model(x[:1, 4:], cache=cache)], 1),
                               model(x[:1]), atol=1e-5, rtol=0)
    # training's loss: the softmax over the outputs alone, i.e. the masked logits' cross-entropy
    targets = torch.full((2, 9), -100)
    targets[0, 1:3], targets[1, 2:5] = outputs[[3, 40]], outputs[[0, 50, 71]]
    batch = {"tokens": x, "doc_ids": doc_ids, "targets": targets,
             "task_ids": torch.where(targets != -100, TASK_NAMES.index("t2i"), -1)}
    loss, _ = decoder_loss(model, batch, outputs=model.outputs)
    counted = targets != -100
    torch.testing.assert_close(loss, F.cross_entropy(logits[counted], targets[counted]))
    assert loss < F.cross_entropy(unrestricted[counted], targets[counted])   # the other ids' mass is gone
    targets[1, 6] = vocab.range("audio:1").offset                          # a target it cannot predict
    with pytest.raises(ValueError, match=f"target id {vocab.range('audio:1').offset} is outside"):
        decoder_loss(model, {**batch, "targets": targets}, outputs=model.outputs)
    with pytest.raises(ConfigError, match="output_ranges"):
        DecoderConfig(vocab_size=vocab.size, output_ranges=((5, 3),))


def test_task_ranges_cover_each_tasks_documents(vocab):
    from pipeline.data import packing

    image, audio = np.arange(8) % 16, np.arange(12).reshape(2, 6) % 8
    docs = [packing.t2i(vocab, "a", [1, 2], image), packing.i2t(vocab, "b", [3], image),
            packing.tts(vocab, "c", [0, 1], audio[:, :2], audio), packing.asr(vocab, "d", audio, [4, 5])]
    for doc in docs:
        ranges = packing.task_ranges(vocab, [doc.task])
        inside = lambda ids: all(any(lo <= i < hi for lo, hi in ranges) for i in ids)
        assert inside(doc.tokens), doc.task
    assert packing.task_ranges(vocab, ["t2i"]) == packing.task_ranges(vocab, ["i2t"])
    assert not any(lo <= vocab.range("audio:1").offset < hi for lo, hi in packing.task_ranges(vocab, ["asr"]))


def test_kv_cache_matches_full_forward(vocab):
    model = tiny_decoder(vocab)
    x = tokens(vocab, 2, 10)
    full = model(x)
    cache = model.new_cache()
    pieces = [model(x[:, :5], cache=cache), model(x[:, 5:7], cache=cache)]    # prompt, then a chunk of 2...
    pieces += [model(x[:, t:t + 1], cache=cache) for t in range(7, 10)]       # ...then one token at a time
    assert cache.length == 10
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_document_positions_restart_at_each_document():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, -1], [3, 3, 3, 3, 3, 3]])
    assert document_positions(doc_ids).tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]]


def two_documents(vocab):
    """A row of two documents and padding, its doc_ids, and the row with document 0 changed."""
    row = tokens(vocab, 1, 15)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7 + [-1] * 3])
    other = row.clone()
    other[0, :5] = tokens(vocab, 5, seed=2)
    return row, doc_ids, other


def test_packed_documents_do_not_see_each_other(vocab):
    model = tiny_decoder(vocab)
    row, doc_ids, other = two_documents(vocab)
    packed = model(row, doc_ids)
    changed = model(other, doc_ids)                                           # document 0 changes...
    assert not torch.allclose(changed[:, :5], packed[:, :5])
    torch.testing.assert_close(changed[:, 5:12], packed[:, 5:12], atol=1e-6, rtol=0)   # ...document 1 does not
    alone = model(row[:, 5:12])                                                # document 1 in a row of its own
    torch.testing.assert_close(packed[:, 5:12], alone, atol=1e-5, rtol=0)
    padding = model(row, torch.full_like(doc_ids, -1))
    assert torch.isfinite(padding).all() and torch.isfinite(packed).all()


@pytest.mark.parametrize("keys", [12, layers.CPU_EXPLICIT_KEYS + 8])   # explicit matmuls, then the fused kernel
def test_bf16_attention_on_cpu_equals_the_fused_kernel_in_fp32(keys):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, keys, 16, generator=generator) for _ in range(3))
    doc_ids = torch.tensor([[0] * (keys // 3) + [1] * (keys - keys // 3 - 2) + [-1] * 2, [5] * keys])
    mask = layers.document_mask(doc_ids)
    low = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    out, reference = layers.attention(*low, mask), F.scaled_dot_product_attention(*full, attn_mask=mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, atol=0.03, rtol=0.03)
    out.float().square().sum().backward()
    reference.square().sum().backward()
    for ours, theirs in zip(low, full):
        torch.testing.assert_close(ours.grad.float(), theirs.grad, atol=0.1, rtol=0.05)
    assert torch.equal(layers.attention(*full, mask), reference)                # fp32: the fused kernel itself


def test_dropout_drops_residual_branches_in_training_only(vocab):
    x = tokens(vocab, 2, 10)
    plain, dropped = tiny_decoder(vocab), tiny_decoder(vocab, dropout=0.5)
    with torch.no_grad():
        assert torch.equal(dropped(x), plain(x))                       # eval: the same weights, the same logits
        dropped.train()
        first, second = dropped(x), dropped(x)
    assert not torch.equal(first, second) and not torch.equal(first, plain(x))
    attention = layers.Attention(layers.TransformerConfig(d_model=32, n_head=2, dropout=0.5)).train()
    out = attention(torch.randn(1, 6, 32), None)
    assert (out == 0).float().mean() > 0.3                             # its output's elements, not its weights


def test_packed_documents_do_not_see_each_other_under_bf16_autocast(vocab):
    model = tiny_decoder(vocab)
    row, doc_ids, other = two_documents(vocab)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        packed, changed = model(row, doc_ids), model(other, doc_ids)
    assert not torch.equal(changed[:, :5], packed[:, :5])
    assert torch.equal(changed[:, 5:12], packed[:, 5:12])                      # weight 0, exactly, across documents
    assert torch.isfinite(packed).all()


def test_doc_ids_with_a_cache_is_refused(vocab):
    model = tiny_decoder(vocab)
    with pytest.raises(ValueError, match="doc_ids"):
        model(tokens(vocab, 1, 3), torch.zeros(1, 3, dtype=torch.long), cache=model.new_cache())


def test_bad_configs_name_the_field(vocab):
    cases = [(DecoderConfig, dict(d_model=100, n_head=3), "d_model"), (DecoderConfig, dict(d_model=96, n_head=32), "d_model"),
             (DecoderConfig, dict(n_layer=0), "n_layer"), (DecoderConfig, dict(dropout=1.0), "dropout"),
             (DecoderConfig, dict(n_head=0), "n_head"), (PartiConfig, dict(encoder_layers=0), "encoder_layers"),
             (PartiConfig, dict(mlp_ratio=0), "mlp_ratio"), (DecoderConfig, dict(image_positions=-1), "image_positions"),
             (DecoderConfig, dict(image_positions=64, image_grid=6), "image_grid")]
    for config, fields, name in cases:
        with pytest.raises(ConfigError) as error:
            config(**fields)
        assert error.value.field == name, (fields, error.value)
    for model, config in ((Decoder, DecoderConfig()), (Parti, PartiConfig())):
        with pytest.raises(ConfigError, match="vocab_size") as error:
            model(config)
        assert error.value.field == "vocab_size"
    with pytest.raises(ConfigError) as error:                                   # image slots need the <boi> id
        Decoder(DecoderConfig(vocab_size=vocab.size, image_positions=4))
    assert error.value.field == "boi_id"


def test_image_slots_follow_each_documents_boi_in_packing_and_in_the_cache(vocab):
    boi = vocab.special("<boi>")
    model = tiny_decoder(vocab, image_positions=4, boi_id=boi)
    row = tokens(vocab, 1, 16)
    row[row == boi] = 0
    row[0, 2], row[0, 11] = boi, boi                     # document 0: a <boi> at 2; document 1 (9..15): at 11
    doc_ids = torch.tensor([[0] * 9 + [1] * 7])
    slots = model.image_slot_embedding(row, doc_ids, None)
    expected = [-1, -1, 0, 1, 2, 3, -1, -1, -1, -1, -1, 0, 1, 2, 3, -1]   # the slot each position predicts
    for t, slot in enumerate(expected):
        want = torch.zeros(32) if slot < 0 else model.image_slots.weight[slot]
        torch.testing.assert_close(slots[0, t], want)
    packed = model(row, doc_ids)
    torch.testing.assert_close(packed[:, 9:], model(row[:, 9:]), atol=1e-5, rtol=0)   # = document 1 alone
    full, cache = model(row), model.new_cache()                  # one document: <boi> at 2 and again at 11
    pieces = [model(row[:, :2], cache=cache), model(row[:, 2:4], cache=cache)]
    pieces += [model(row[:, t:t + 1], cache=cache) for t in range(4, 16)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)
    grid = tiny_decoder(vocab, image_positions=4, image_grid=2, boi_id=boi)     # 2x2: slot 3 is row 1, column 1
    slots = grid.image_slot_embedding(row, doc_ids, None)
    torch.testing.assert_close(slots[0, 5], grid.image_slots.weight[3] + grid.image_rows.weight[1] + grid.image_cols.weight[1])
    torch.testing.assert_close(slots[0, 3], grid.image_slots.weight[1] + grid.image_rows.weight[0] + grid.image_cols.weight[1])
    assert not slots[0, 6:11].any()
    plain = copy.deepcopy(model)                                 # slot embeddings zeroed: differs only from a <boi> on
    plain.image_slots.weight.data.zero_()
    differs = (plain(row) - full).abs().amax(-1)[0] > 1e-6
    assert not differs[:2].any() and differs[2]



def test_image_code_digits_add_each_fsq_digits_embedding_to_image_codes_alone():
    from vector_quantize_pytorch import FSQ

    levels = (4, 3)                                             # 12 codes, numbered as the library's FSQ numbers them
    vocab = vocab_module.build(text_size=50, image_codes=12)
    start = vocab.range("image").offset
    model = tiny_decoder(vocab, image_code_digits=True, image_code_levels=levels, image_code_start=start).train()
    table, digit = model.token_table(), model.code_digits.embed.weight
    torch.testing.assert_close(table[:start], model.embed.weight[:start])          # text and specials untouched
    torch.testing.assert_close(table[start + 12:], model.embed.weight[start + 12:])
    level_indices = FSQ(levels=list(levels)).indices_to_level_indices(torch.arange(12))    # (12, 2)
    for code, digits in enumerate(level_indices.tolist()):
        rows = [digits[0], 4 + digits[1]]                                        # each level's own table rows
        torch.testing.assert_close(table[start + code], model.embed.weight[start + code] + digit[rows].sum(0))
    plain = tiny_decoder(vocab)                                  # the same weights without the digits
    assert plain.load_state_dict(model.state_dict(), strict=False).unexpected_keys == ["code_digits.embed.weight"]
    text = torch.tensor([[1, 2, 3]])
    with torch.no_grad():                                        # tied: only the image codes' output rows change
        differs = (model(text) - plain(text)).abs().amax(dim=(0, 1)) > 1e-6
    assert differs[start:start + 12].all() and not differs[:start].any() and not differs[start + 12:].any()
    x = torch.tensor([[1, start + 5, start + 11, 2]])
    logits = model(x)
    F.cross_entropy(logits[0, :-1], x[0, 1:]).backward()
    assert digit.grad.abs().sum() > 0                           # they train
    for fields, name in ((dict(image_code_digits=True), "image_code_levels"),
                         (dict(image_code_digits=True, image_code_levels=levels, image_code_start=vocab.size - 4),
                          "image_code_start"), (dict(image_code_levels=(4, 1)), "image_code_levels")):
        with pytest.raises(ConfigError) as error:
            tiny_decoder(vocab, **fields)
        assert error.value.field == name, fields


# ---- sampling -----------------------------------------------------------------------------------

def naive_greedy(model, prompt, n, uncond=None, scale=1.0):
    """Greedy decoding by re-running the whole sequence for every token (no cache)."""
    seq, useq = prompt, uncond
    for _ in range(n):
        logits = model(seq)[:, -1]
        if uncond is not None:
            logits = guide(logits, model(useq)[:, -1], scale)
        token = logits.argmax(-1, keepdim=True)
        seq = torch.cat([seq, token], 1)
        useq = None if uncond is None else torch.cat([useq, token], 1)
    return seq[:, prompt.shape[1]:]


def test_generate_greedy_equals_uncached_greedy(vocab):
    model, prompt = tiny_decoder(vocab), tokens(vocab, 2, 4)
    out = generate(model, prompt, 6, temperature=0)
    assert out.shape == (2, 6)
    assert torch.equal(out, naive_greedy(model, prompt, 6))
    assert torch.equal(out, generate(model, prompt, 6, temperature=0))
    assert generate(model, prompt, 0).shape == (2, 0)


def test_generate_samples_only_the_allowed_range(vocab):
    model, image = tiny_decoder(vocab), vocab.range("image")
    allowed = (image.offset, image.offset + image.size)
    out = generate(model, tokens(vocab, 3, 4), 20, allowed=allowed, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 20)
    assert ((out >= allowed[0]) & (out < allowed[1])).all()
    assert len(out.unique()) > 1                                              # sampled, not constant


def test_top_k_1_and_tiny_top_p_are_greedy(vocab):
    model, prompt = tiny_decoder(vocab), tokens(vocab, 2, 4)
    greedy = generate(model, prompt, 8, temperature=0)
    assert torch.equal(generate(model, prompt, 8, top_k=1, generator=torch.Generator().manual_seed(3)), greedy)
    assert torch.equal(generate(model, prompt, 8, top_p=1e-6, generator=torch.Generator().manual_seed(4)), greedy)


def test_a_batch_with_a_generator_per_row_samples_each_row_as_it_would_alone(vocab):
    model, prompt = tiny_decoder(vocab), tokens(vocab, 1, 4)
    alone = [generate(model, prompt, 8, generator=torch.Generator().manual_seed(seed)) for seed in (1, 2, 3)]
    batch = generate(model, prompt.expand(3, -1), 8, generator=[torch.Generator().manual_seed(seed) for seed in (1, 2, 3)])
    assert torch.equal(batch, torch.cat(alone)) and len({tuple(row.tolist()) for row in batch}) == 3


def test_sample_next_keeps_to_top_k_and_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, -1.0, -2.0]]).expand(500, 5)
    picked = sample_next(logits, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(picked.tolist()) == {0, 1}
    probs = logits[0].softmax(-1)                      # ~0.66, 0.24, 0.09, ...: top_p 0.8 keeps the first two
    assert probs[0] < 0.8 <= probs[:2].sum()
    picked = sample_next(logits, top_p=0.8, generator=torch.Generator().manual_seed(0))
    assert set(picked.tolist()) == {0, 1}
    assert sample_next(logits, temperature=0).eq(0).all()


def scripted(rows: list[list[int]], vocab_size: int = 10):
    """A Step that emits rows[b][i] as its i-th token (one-hot logits), recording the shapes fed."""
    fed = []

    def step(new):
        fed.append(tuple(new.shape))
        i = len(fed) - 1
        return F.one_hot(torch.tensor([row[i] for row in rows]), vocab_size).float() * 10
    return step, fed


def test_stop_pads_finished_rows_and_ends_when_all_stopped():
    stop = 9
    step, fed = scripted([[3, 5, stop, 7, 7], [4, stop, 2, 2, 2]])
    out = sample_loop(step, torch.zeros(2, 4, dtype=torch.long), 5, stop=stop, temperature=0)
    assert out.tolist() == [[3, 5, stop], [4, stop, stop]]
    assert fed == [(2, 4), (2, 1), (2, 1)]                     # the prompt once, then one token per step
    step, _ = scripted([[3, 5, 6, 7], [4, stop, 2, 2]])
    out = sample_loop(step, torch.zeros(2, 1, dtype=torch.long), 4, stop=stop, temperature=0)
    assert out.tolist() == [[3, 5, 6, 7], [4, stop, stop, stop]]


def test_classifier_free_guidance(vocab):
    cond, uncond = torch.randn(3, 7), torch.randn(3, 7)
    assert torch.allclose(guide(cond, uncond, 1.0), cond) and torch.equal(guide(cond, uncond, 0.0), uncond)
    assert torch.allclose(guide(cond, uncond, 3.0), 3 * cond - 2 * uncond, atol=1e-6)
    model, prompt, empty = tiny_decoder(vocab, tie_embeddings=False), tokens(vocab, 2, 5), tokens(vocab, 2, 2, seed=7)
    plain = generate(model, prompt, 6, temperature=0)
    assert torch.equal(generate(model, prompt, 6, temperature=0, cfg_scale=1.0, uncond_prompt=empty), plain)
    guided = generate(model, prompt, 6, temperature=0, cfg_scale=3.0, uncond_prompt=empty)
    assert torch.equal(guided, naive_greedy(model, prompt, 6, uncond=empty, scale=3.0))
    unconditional = generate(model, prompt, 6, temperature=0, cfg_scale=0.0, uncond_prompt=empty)
    assert torch.equal(unconditional, generate(model, empty, 6, temperature=0))     # scale 0: the uncond stream alone
    assert not torch.equal(unconditional, plain)


def test_image_to_text_samples_text_ids_up_to_eos(vocab):
    from pipeline.models.samplers import SamplingSettings, image_to_text
    from pipeline.models.token_model import TokenModel

    model = TokenModel("decoder", tiny_decoder(vocab, tie_embeddings=False), vocab)
    image, text, eos = np.arange(4) % 16, vocab.range("text"), vocab.special("<eos>")
    prompt = torch.tensor([[vocab.special("<bos>"), vocab.special("<i2t>"), vocab.special("<boi>"),
                            *vocab.to_global("image", image).tolist(), vocab.special("<eoi>")]])
    unrestricted = generate(model.net, prompt, 6, temperature=0)[0].tolist()
    assert not all(text.offset <= t < text.offset + text.size for t in unrestricted)   # the untrained model strays
    caption = image_to_text(model, image, 6, SamplingSettings(temperature=0))
    restricted = generate(model.net, prompt, 6, allowed=(text.offset, text.offset + text.size), stop=eos,
                          temperature=0)[0].tolist()
    assert caption == [t - text.offset for t in itertools.takewhile(lambda t: t != eos, restricted)]
    assert len(caption) == 6 and all(0 <= t < text.size for t in caption)


def test_image_to_text_guidance_is_against_the_t2i_caption_prior(vocab):
    """i2t_cfg_scale guides the captioning stream with `<bos> <t2i>`: scale 0 writes the prior's caption."""
    from pipeline.models.samplers import SamplingSettings, image_to_text
    from pipeline.models.token_model import TokenModel

    model = TokenModel("decoder", tiny_decoder(vocab, tie_embeddings=False), vocab)
    image, text, eos = np.arange(4) % 16, vocab.range("text"), vocab.special("<eos>")
    allowed = (text.offset, text.offset + text.size)
    prompt = torch.tensor([[vocab.special("<bos>"), vocab.special("<i2t>"), vocab.special("<boi>"),
                            *vocab.to_global("image", image).tolist(), vocab.special("<eoi>")]])
    prior = torch.tensor([[vocab.special("<bos>"), vocab.special("<t2i>")]])

    def caption(scale):
        return image_to_text(model, image, 6, SamplingSettings(temperature=0, i2t_cfg_scale=scale))

    def local(ids):
        return [t - text.offset for t in itertools.takewhile(lambda t: t != eos, ids[0].tolist())]

    guided = generate(model.net, prompt, 6, allowed=allowed, stop=eos, temperature=0, cfg_scale=2.0,
                      uncond_prompt=prior)
    assert caption(2.0) == local(guided)
    assert caption(0.0) == local(generate(model.net, prior, 6, allowed=allowed, stop=eos, temperature=0))
    assert caption(2.0) != caption(1.0) and caption(0.0) != caption(1.0)


def test_rerank_keeps_the_candidate_the_model_scores_best(vocab):
    """rerank samples images with their own salts and keeps the one under which the caption is likeliest
    (i2t); i2t_rerank keeps, among the caption and its deviations, the one best by log P(image | caption)
    + CAPTION_WEIGHT x log P(caption | image)."""
    from dataclasses import replace

    from pipeline.data import packing
    from pipeline.models.evaluation import _document_losses
    from pipeline.models.rerank import CAPTION_WEIGHT, target_log_likelihood, target_log_likelihoods
    from pipeline.models.samplers import (SamplingError, SamplingSettings, caption_deviations, image_to_text,
                                          text_to_image)
    from pipeline.models.token_model import TokenModel

    model = TokenModel("decoder", tiny_decoder(vocab, tie_embeddings=False), vocab)
    text, image, salt = [3, 7, 11], np.arange(4) % 16, 5
    s = SamplingSettings(temperature=1.0, cfg_scale=1.0)
    doc = packing.i2t(vocab, "k", text, image)
    with torch.no_grad():
        loss = _document_losses(model, doc)["i2t"]           # mean over the target's ids, as evaluation scores it
    assert target_log_likelihood(model, doc) == pytest.approx(-loss * (len(doc.tokens) - doc.target), rel=1e-4)
    mixed = [doc, packing.i2t(vocab, "", [5], image), packing.t2i(vocab, "", text, image), packing.i2t(vocab, "", [9], image)]
    assert target_log_likelihoods(model, mixed) == pytest.approx([target_log_likelihood(model, d) for d in mixed], rel=1e-5)

    images = [text_to_image(model, text, 4, s, salt=salt + k * 100_003) for k in range(4)]
    assert len({tuple(x) for x in images}) > 1                                    # the choice is a real one
    scores = [target_log_likelihood(model, packing.i2t(vocab, "", text, x)) for x in images]
    assert list(text_to_image(model, text, 4, replace(s, rerank=4), salt=salt)) == list(images[int(np.argmax(scores))])

    greedy = replace(s, temperature=0.0)
    captions = [image_to_text(model, image, 5, greedy, salt=salt)]
    captions += caption_deviations(model, image, captions[0], 5, greedy, 3)
    assert len({tuple(x) for x in captions}) == 4
    channel = [target_log_likelihood(model, packing.t2i(vocab, "", c, image))
               + CAPTION_WEIGHT * target_log_likelihood(model, packing.i2t(vocab, "", c, image)) for c in captions]
    assert image_to_text(model, image, 5, replace(greedy, i2t_rerank=4), salt=salt) == captions[int(np.argmax(channel))]

    with pytest.raises(SamplingError, match="rerank needs a model that also captions images"):
        text_to_image(TokenModel("parti", tiny_parti(vocab), vocab), text, 4, replace(s, rerank=2))
    with pytest.raises(ValueError, match="need >= 1"):
        SamplingSettings(rerank=0)



@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_caption_deviations_are_the_likeliest_one_id_departures_completed_greedily(vocab, scale):
    """Checked against log-probabilities from the uncached forward of each prefix: every deviation
    leaves the caption at one position, continues greedily, and no departure left out is likelier."""
    from pipeline.models.samplers import SamplingSettings, caption_deviations, image_to_text
    from pipeline.models.token_model import TokenModel

    model = TokenModel("decoder", tiny_decoder(vocab, tie_embeddings=False), vocab)
    image, text, eos = np.arange(4) % 16, vocab.range("text"), vocab.special("<eos>")
    greedy = SamplingSettings(temperature=0, i2t_cfg_scale=scale)
    prompt = [vocab.special("<bos>"), vocab.special("<i2t>"), vocab.special("<boi>"),
              *vocab.to_global("image", image).tolist(), vocab.special("<eoi>")]
    prior = [vocab.special("<bos>"), vocab.special("<t2i>")]
    allowed = torch.full((vocab.size,), float("-inf"))
    allowed[text.offset:text.offset + text.size] = allowed[eos] = 0

    def log_probs(prefix):          # the next id after the caption prefix (local ids), guided as sampled
        ids = vocab.to_global("text", prefix).tolist()
        with torch.no_grad():
            cond = model.net(torch.tensor([prompt + ids]))[0, -1]
            logits = guide(cond, model.net(torch.tensor([prior + ids]))[0, -1], scale)
        return (logits + allowed).log_softmax(-1)

    def completion(prefix):
        with torch.no_grad():
            new = generate(model.net, torch.tensor([prompt + vocab.to_global("text", prefix).tolist()]), 8 - len(prefix),
                           allowed=(text.offset, text.offset + text.size), stop=eos, temperature=0, cfg_scale=scale,
                           uncond_prompt=torch.tensor([prior + vocab.to_global("text", prefix).tolist()]))
        return prefix + [t - text.offset for t in itertools.takewhile(lambda t: t != eos, new[0].tolist())]

    caption = image_to_text(model, image, 8, greedy)
    assert caption == completion([])
    written = [t + text.offset for t in caption] + ([eos] if len(caption) < 8 else [])
    costs = {(p, a): float(row[a] - row[written[p]]) for p in range(len(written))
             for row in [log_probs(caption[:p])] for a in range(vocab.size) if a != written[p] and row[a] > -math.inf}
    deviations = caption_deviations(model, image, caption, 8, greedy, 5)
    assert len(deviations) == 5
    taken = []
    for d in deviations:
        p = next(i for i in range(len(written)) if i >= len(d) or d[i] + text.offset != written[i])
        taken.append((p, eos if p == len(d) else d[p] + text.offset))
        assert d == (caption[:p] if taken[-1][1] == eos else completion(caption[:p] + [d[p]]))
    found = [costs[t] for t in taken]
    assert found == sorted(found, reverse=True) and len(set(taken)) == 5
    assert max(c for t, c in costs.items() if t not in taken) <= min(found) + 1e-4
    one_id = caption_deviations(model, image, caption[:1], 1, greedy, 10**6)     # all there are: the other ids and <eos>
    assert len(one_id) == text.size and [] in one_id

# ---- Parti --------------------------------------------------------------------------------------

def t2i_docs():
    return [{"text": np.array([3, 9, 4]), "image": np.arange(6) % 16},
            {"text": np.array([10, 11, 12, 13, 14, 15]), "image": np.array([15, 1, 2, 3])}]


def test_collate_layout(vocab):
    batch = collate(vocab, t2i_docs())
    bos, boi, eoi, pad = (vocab.special(t) for t in ("<bos>", "<boi>", "<eoi>", "<pad>"))
    text0, image0 = vocab.range("text").offset, vocab.range("image").offset
    assert batch["text"][0].tolist() == [bos, text0 + 3, text0 + 9, text0 + 4, pad, pad, pad]
    assert batch["text_mask"].sum(1).tolist() == [4, 7]
    assert batch["image_in"][1].tolist() == [boi, image0 + 15, image0 + 1, image0 + 2, image0 + 3, pad, pad]
    assert batch["targets"][1].tolist() == [image0 + 15, image0 + 1, image0 + 2, image0 + 3, eoi, -100, -100]
    assert batch["targets"][0, -1].item() == eoi and batch["image_in"].shape == (2, 7)
    dropped = collate(vocab, t2i_docs(), caption_dropout=1.0, rng=np.random.default_rng(0))
    assert dropped["text"].tolist() == [[bos], [bos]] and dropped["text_mask"].all()


def test_parti_forward_backward_and_loss(vocab):
    model, batch = tiny_parti(vocab).train(), collate(vocab, t2i_docs())
    assert model(batch["text"], batch["text_mask"], batch["image_in"]).shape == (2, 7, vocab.size)
    loss, stats = training_loss(model, batch)
    loss.backward()
    assert stats == {"loss_t2i": pytest.approx(loss.item())}
    assert abs(loss.item() - math.log(vocab.size)) < 1.0                     # near uniform at init
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert model.head.weight is model.embed.weight


def test_parti_text_padding_is_masked(vocab):
    model, docs = tiny_parti(vocab), t2i_docs()
    batch, alone = collate(vocab, docs), collate(vocab, docs[:1])             # doc 0 padded vs not
    assert batch["text"].shape[1] > alone["text"].shape[1]
    padded = model(batch["text"], batch["text_mask"], batch["image_in"])[:1, :7]
    single = model(alone["text"], alone["text_mask"], alone["image_in"])
    torch.testing.assert_close(padded, single, atol=1e-5, rtol=0)
    garbage = batch["text"].masked_fill(~batch["text_mask"], 5)              # what padding holds does not matter
    torch.testing.assert_close(model(garbage, batch["text_mask"], batch["image_in"])[:1], padded, atol=1e-6, rtol=0)


def test_parti_kv_cache_matches_full_forward(vocab):
    model, batch = tiny_parti(vocab), collate(vocab, t2i_docs())
    text, mask, image_in = batch["text"], batch["text_mask"], batch["image_in"]
    full = model(text, mask, image_in)
    memory, cache = model.encode(text, mask), model.new_cache()
    pieces = [model(text, mask, image_in[:, :3], cache=cache, memory=memory)]
    pieces += [model(text, mask, image_in[:, t:t + 1], cache=cache, memory=memory) for t in range(3, 7)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_generate_image(vocab):
    model = tiny_parti(vocab)
    codes = generate_image(model, vocab, [3, 9, 4], 12, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (12,) and ((codes >= 0) & (codes < 16)).all()
    greedy = generate_image(model, vocab, [3, 9, 4], 12, temperature=0)
    assert torch.equal(greedy, generate_image(model, vocab, [3, 9, 4], 12, temperature=0))
    guided = generate_image(model, vocab, [3, 9, 4], 12, cfg_scale=3.0, top_k=4,
                            generator=torch.Generator().manual_seed(0))
    assert guided.shape == (12,) and ((guided >= 0) & (guided < 16)).all()
    # the first guided greedy code is the argmax over the image range of u + 3 (c - u)
    boi = torch.tensor([[vocab.special("<boi>")]])
    cond_text, empty_text = parti_module.caption(vocab, [3, 9, 4])[None], parti_module.caption(vocab, [])[None]
    logit = lambda text: model(text, torch.ones_like(text, dtype=torch.bool), boi)[0, -1]
    image = vocab.range("image")
    expected = guide(logit(cond_text), logit(empty_text), 3.0)[image.offset:image.offset + image.size].argmax()
    assert generate_image(model, vocab, [3, 9, 4], 1, temperature=0, cfg_scale=3.0).item() == expected.item()


def test_muon_trains_the_blocks_matrices_and_its_state_resumes_exactly(vocab):
    from pipeline.models.train_tasks import TokenTrainSettings
    from pipeline.train_loop import lr_scale, new_optimizer, train_step

    settings = TokenTrainSettings(optimizer="muon", lr=1e-3, muon_lr=0.02, steps=8, warmup_steps=2)
    torch.manual_seed(0)
    net = Decoder(DecoderConfig(vocab_size=vocab.size, n_layer=2, n_head=2, d_model=32, image_positions=4,
                                image_grid=2, boi_id=vocab.special("<boi>")))
    optimizer = new_optimizer(net, settings)
    muon, adamw = optimizer.parts
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    adamw_ids = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert muon_ids == {id(p) for block in net.blocks for p in block.parameters() if p.dim() == 2}
    assert not muon_ids & adamw_ids and muon_ids | adamw_ids == {id(p) for p in net.parameters()}
    assert id(net.embed.weight) in adamw_ids and id(net.image_rows.weight) in adamw_ids   # tables stay AdamW's
    tokens = torch.randint(0, vocab.size, (3, 12), generator=torch.Generator().manual_seed(1))

    task = SimpleNamespace(settings=settings, loss=lambda net, model, batch: (
        F.cross_entropy(net(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()), {}))

    def train(net, optimizer, steps):
        for step in steps:
            train_step(task, net, net, optimizer, [tokens], step)

    train(net, optimizer, range(3))
    saved = copy.deepcopy({"model": net.state_dict(), "optimizer": optimizer.state_dict()})
    train(net, optimizer, range(3, 6))
    resumed = Decoder(net.config)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = new_optimizer(resumed, settings)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    train(resumed, resumed_optimizer, range(3, 6))
    for a, b in zip(net.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b)            # momentum and Adam moments came back with the weights
    assert [g["lr"] for g in resumed_optimizer.param_groups] == pytest.approx(
        [0.02 * lr_scale(5, settings), 1e-3 * lr_scale(5, settings), 1e-3 * lr_scale(5, settings)])
    with pytest.raises(ValueError, match="optimizer muon: Linear has no transformer blocks"):
        new_optimizer(torch.nn.Linear(4, 4), settings)


def test_a_decoder_whose_tasks_hold_every_id_is_not_restricted():
    from pipeline.models import token_model

    images_and_text = vocab_module.build(text_size=50, image_codes=16)
    speech_too = vocab_module.build(text_size=50, image_codes=16, audio_codebooks=2, audio_codebook_size=8)
    spec = {"arch": "decoder", "n_layer": 1, "d_model": 32, "n_head": 2}
    assert token_model.model_config(spec, images_and_text, tasks=("t2i", "i2t")).output_ranges == ()
    assert token_model.model_config(spec, speech_too, tasks=("t2i", "i2t")).output_ranges == ((0, 86),)
    assert token_model.model_config(spec, speech_too).output_ranges == ()          # no tasks named: every id
    assert token_model.build("decoder", token_model.model_config(spec, images_and_text, tasks=("t2i",))).outputs is None
