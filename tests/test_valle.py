"""VALL-E on tiny configs, against real tts documents (packing.tts -> packing.parse)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data import packing
from pipeline.models.valle import NAR_INPUTS, NARModel, Valle, ValleConfig, collate, synthesize
from pipeline.tokenizers import vocab as vocab_module
from pipeline.tokenizers.config_checks import ConfigError

VOCAB = vocab_module.build(text_size=50, phonemes=("a", "b", "c", "|"), audio_codebooks=4, audio_codebook_size=16)
N_Q, K = 4, 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; more spin against each other when the cores are busy (20x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(**overrides) -> ValleConfig:
    sizes = dict(vocab_size=VOCAB.size, n_q=N_Q, codebook_size=K, ar_layers=1, nar_layers=1, n_head=2, d_model=32)
    return ValleConfig(**{**sizes, **overrides})


def tts_doc(seed: int, phonemes: int, prompt_frames: int, frames: int) -> dict:
    rng = np.random.default_rng(seed)
    doc = packing.tts(VOCAB, f"utt{seed}", rng.integers(0, 4, phonemes).tolist(),
                      rng.integers(0, K, (N_Q, prompt_frames)), rng.integers(0, K, (N_Q, frames)))
    return packing.parse(VOCAB, doc.tokens)


def nar_logits(nar: NARModel, batch: dict, q: int) -> torch.Tensor:
    inputs = [batch[f"nar_{k}"] for k in NAR_INPUTS[:-1]]
    return nar(*inputs, torch.full((len(inputs[0]),), q))


def test_collate_scores_only_speech_and_eoa():
    docs = [tts_doc(0, 3, 2, 5), tts_doc(1, 6, 4, 2)]
    batch = collate(VOCAB, docs, torch.Generator().manual_seed(0))
    special = VOCAB.special
    for i, d in enumerate(docs):
        speech0 = VOCAB.to_global("audio:0", d["speech"][0]).tolist()
        row = ([special("<bos>"), special("<tts>")] + VOCAB.to_global("phoneme", d["phonemes"]).tolist() + [special("<sep>")]
               + VOCAB.to_global("audio:0", d["prompt"][0]).tolist() + [special("<boa>")] + speech0)
        assert batch["ar_tokens"][i, :len(row)].tolist() == row
        assert (batch["ar_tokens"][i, len(row):] == special("<pad>")).all()
        scored = batch["ar_targets"][i] != -100
        assert batch["ar_targets"][i, scored].tolist() == speech0 + [special("<eoa>")]
        assert batch["ar_tokens"][i, scored].tolist() == [special("<boa>")] + speech0   # each target follows its input
        q = int(batch["nar_q"][i])
        T = d["speech"].shape[1]
        assert batch["nar_targets"][i, :T].tolist() == d["speech"][q].tolist()
        assert (batch["nar_targets"][i, T:] == -100).all()
    assert batch["ar_tokens"].shape == batch["ar_targets"].shape == (2, 2 + 6 + 1 + 4 + 1 + 2)
    audio0 = VOCAB.range("audio:0")
    assert batch["ar_columns"].tolist() == [special("<eoa>"), *range(audio0.offset, audio0.offset + K)]
    assert batch["nar_phonemes"].shape == (2, 6) and batch["nar_phoneme_mask"].sum(1).tolist() == [3, 6]
    assert batch["nar_prompt"].shape == (2, N_Q, 4) and batch["nar_prompt_mask"].sum(1).tolist() == [2, 4]
    assert batch["nar_codes"].shape == (2, N_Q, 5) and batch["nar_frame_mask"].sum(1).tolist() == [5, 2]
    assert batch["nar_targets"].shape == (2, 5)
    assert (batch["nar_codes"][0, 2, :5].numpy() == VOCAB.to_global("audio:2", docs[0]["speech"][2])).all()

    many = [tts_doc(2, 2, 1, 1)] * 60
    qs = collate(VOCAB, many, torch.Generator().manual_seed(5))["nar_q"]
    assert set(qs.tolist()) == {1, 2, 3}                                                  # uniform over 1..n_q-1
    assert qs.tolist() == collate(VOCAB, many, torch.Generator().manual_seed(5))["nar_q"].tolist()


def test_forward_backward_gives_every_parameter_a_gradient():
    torch.manual_seed(0)
    model = Valle(config())
    batch = collate(VOCAB, [tts_doc(0, 3, 2, 5), tts_doc(1, 6, 4, 2)], torch.Generator().manual_seed(0))
    loss, stats = model(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert set(stats) == {"loss_tts_ar", "loss_tts_nar", "acc_tts_ar"} and 0 <= stats["acc_tts_ar"] <= 1
    assert loss.item() == pytest.approx(stats["loss_tts_ar"] + stats["loss_tts_nar"], rel=1e-5)
    assert stats["loss_tts_ar"] == pytest.approx(np.log(K + 1), rel=0.2)   # near-uniform over <eoa> + audio:0 at init
    assert stats["loss_tts_nar"] == pytest.approx(np.log(K), rel=0.2)
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient (DDP would need find_unused_parameters): {missing}"
    assert model.nar.head.weight.grad.abs().sum() > 0 and model.ar.embed.weight.grad.abs().sum() > 0


def test_ar_loss_is_the_full_heads_cross_entropy_renormalized_over_what_it_can_predict():
    torch.manual_seed(0)
    model = Valle(config())
    batch = collate(VOCAB, [tts_doc(0, 3, 2, 5), tts_doc(1, 6, 4, 2)], torch.Generator().manual_seed(0))
    _, stats = model(batch)
    targets, columns = batch["ar_targets"], batch["ar_columns"]
    scored = targets != -100
    full = model.ar(batch["ar_tokens"])[scored]                                        # (N, V): every id's logit
    expected = F.cross_entropy(full[:, columns], torch.searchsorted(columns, targets[scored]))
    assert stats["loss_tts_ar"] == pytest.approx(expected.item(), rel=1e-5)
    assert stats["loss_tts_ar"] < F.cross_entropy(full, targets[scored]).item()         # no mass on other ids


def test_nar_predicts_codebook_q_from_codebooks_below_q_only():
    torch.manual_seed(0)
    nar = NARModel(config()).eval()
    batch = collate(VOCAB, [tts_doc(0, 3, 2, 5), tts_doc(1, 6, 4, 2)], torch.Generator().manual_seed(0))
    rng = np.random.default_rng(1)
    for q in range(1, N_Q):
        logits = nar_logits(nar, batch, q)
        assert logits.shape == (2, 5, K) and torch.isfinite(logits).all()
        above = {**batch, "nar_codes": batch["nar_codes"].clone()}
        for level in range(q, N_Q):                                      # the answer and codebooks above it
            noise = VOCAB.to_global(f"audio:{level}", rng.integers(0, K, (2, 5)))
            above["nar_codes"][:, level] = torch.as_tensor(noise)
        torch.testing.assert_close(nar_logits(nar, above, q), logits)
        below = {**batch, "nar_codes": batch["nar_codes"].clone()}
        below["nar_codes"][:, q - 1] = VOCAB.range(f"audio:{q - 1}").offset + (below["nar_codes"][:, q - 1] + 1) % K
        assert not torch.allclose(nar_logits(nar, below, q), logits)


def test_nar_logits_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    nar = NARModel(config(nar_layers=2)).eval()
    short, long = tts_doc(0, 2, 2, 3), tts_doc(1, 7, 5, 8)
    alone = collate(VOCAB, [short], torch.Generator())
    for docs, row in (([short, long], 0), ([long, short], 1)):
        together = collate(VOCAB, docs, torch.Generator())
        for q in range(1, N_Q):
            torch.testing.assert_close(nar_logits(nar, together, q)[row, :3], nar_logits(nar, alone, q)[0],
                                       atol=1e-5, rtol=1e-5)


def test_synthesize_returns_codes_and_is_seeded():
    torch.manual_seed(0)
    model = Valle(config()).train()
    prompt = torch.randint(0, K, (N_Q, 3))
    runs = [synthesize(model, VOCAB, [0, 1, 2, 3], prompt, max_frames=6, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    codes = runs[0]
    assert codes.dtype == torch.long and codes.shape[0] == N_Q and codes.shape[1] <= 6
    assert ((codes >= 0) & (codes < K)).all()
    assert torch.equal(runs[0], runs[1])
    assert model.training                                                # restored after generating
    long_run = synthesize(model, VOCAB, [0, 1], prompt, max_frames=40, temperature=0.0)
    assert long_run.shape[0] == N_Q and 0 <= long_run.shape[1] <= 40


def test_overfits_one_document_and_synthesizes_it_back():
    torch.manual_seed(0)
    doc = tts_doc(3, 4, 3, 6)
    batch = collate(VOCAB, [doc] * (N_Q - 1), torch.Generator())
    batch["nar_q"] = torch.arange(1, N_Q)                                # every level once
    batch["nar_targets"] = torch.as_tensor(doc["speech"][1:])
    model = Valle(config(ar_layers=2, nar_layers=2, d_model=64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(150):
        loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::10]
    codes = synthesize(model, VOCAB, doc["phonemes"].tolist(), torch.as_tensor(doc["prompt"]), max_frames=20,
                       temperature=0.0)
    assert codes.tolist() == doc["speech"].tolist()                     # AR stops at <eoa>, NAR fills every level


def test_bad_configs_name_the_field():
    ValleConfig()                                                        # sizes stay 0 until set from the vocabulary
    for overrides, field in ((dict(d_model=30, n_head=4), "d_model"), (dict(d_model=12, n_head=4), "d_model"),
                             (dict(n_head=0), "n_head"), (dict(nar_layers=0), "nar_layers"), (dict(n_q=-1), "n_q"),
                             (dict(dropout=1.0), "dropout"), (dict(codebook_size=-2), "codebook_size")):
        with pytest.raises(ConfigError) as error:
            config(**overrides)
        assert error.value.field == field
    for overrides, field in ((dict(n_q=1), "n_q"), (dict(vocab_size=0), "vocab_size"),
                             (dict(codebook_size=0), "codebook_size")):
        with pytest.raises(ConfigError) as error:
            Valle(config(**overrides))
        assert error.value.field == field
