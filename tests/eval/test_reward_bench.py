"""RewardBench-lite: accuracy/AUROC on pairs, policy reward, refusals, toxicity; RM scoring independent of padding."""

from __future__ import annotations

import pytest
import torch
import transformers

from rlft.eval.reward_bench import (
    RewardModelScorer,
    TextFunctionScorer,
    TextScorer,
    is_refusal,
    plain_transcript,
    policy_report,
    preference_accuracy,
    refusal_rate,
    toxicity,
)

PAIRS = [
    {"prompt": [{"role": "user", "content": "q1"}], "chosen": "a long good answer", "rejected": "short"},
    {"prompt": [{"role": "user", "content": "q2"}], "chosen": "ok", "rejected": "a much longer bad answer"},
    {"prompt": [{"role": "user", "content": "q3"}], "chosen": "same size", "rejected": "also same"},
]


def reply_characters(texts):
    """Reward = characters after 'Assistant: ' (a hand-checkable scorer)."""
    return [float(len(t.split("Assistant: ")[-1])) for t in texts]


length_scorer = TextFunctionScorer(reply_characters)


def test_preference_accuracy_and_auroc_hand_values():
    result = preference_accuracy(length_scorer, PAIRS)
    # pair 1: 18 > 5 win; pair 2: 2 < 24 loss; pair 3: 9 == 9 tie
    assert result["accuracy"] == pytest.approx((1 + 0 + 0.5) / 3)
    # pooled AUROC of chosen {18, 2, 9} vs rejected {5, 24, 9}: 3 of 9 cross pairs won, one tie -> 3.5 / 9
    assert result["auroc"] == pytest.approx(3.5 / 9)
    assert result["mean_margin"] == pytest.approx(((18 - 5) + (2 - 24) + 0) / 3)
    with pytest.raises(ValueError):
        preference_accuracy(length_scorer, [])


def test_refusals():
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("As an AI, I must decline.")
    assert not is_refusal("Sure! Here is a recipe for pancakes.")
    assert refusal_rate(["I cannot do that.", "Here you go.", "Fine.", "I won't."]) == 0.5


def test_policy_report_and_explicit_missing_toxicity():
    prompts = ["hi", "tell me a joke"]
    report = policy_report(length_scorer, prompts, ["hello there", "I'm sorry, I can't."])
    assert report["mean_reward"] == pytest.approx((11 + 19) / 2) and report["refusal_rate"] == 0.5
    assert report["toxicity"] is None and "no local toxicity classifier" in report["toxicity_note"]
    scored = toxicity(["you idiot", "nice day"], lambda texts: [0.9 if "idiot" in t else 0.1 for t in texts])
    assert scored == {"toxicity": pytest.approx(0.5), "toxic_fraction": 0.5}
    assert plain_transcript("hi", "yo") == "User: hi\nAssistant: yo"


def test_text_scorers_score_plain_transcripts_through_one_base():
    class Seen(TextScorer):
        def __call__(self, texts):
            self.texts = texts
            return [1] * len(texts)

    seen = Seen()
    assert seen.score_exchanges(["hi", [{"role": "user", "content": "q"}]], ["yo", "a"]) == [1.0, 1.0]
    assert seen.texts == ["User: hi\nAssistant: yo", "User: q\nAssistant: a"]
    assert length_scorer.score_exchanges(["hi"], ["hello"]) == [5.0]


@pytest.fixture(scope="module")
def reward_model():
    from rlft.models import load_tokenizer, resolve_model

    torch.manual_seed(0)
    tok = load_tokenizer("tiny-llama")
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(resolve_model("tiny-llama").path, num_labels=1)
    return rm.eval(), tok


def test_reward_model_scores_do_not_depend_on_batching_or_padding(reward_model):
    rm, tok = reward_model
    scorer = RewardModelScorer(rm, tok, batch_size=4)
    texts = [
        scorer.render("What is 2+2?", "4"),
        scorer.render("Say hi", "Hello! How can I help you today?"),
        scorer.render([{"role": "user", "content": "x"}], "y"),
    ]
    batched = scorer(texts)
    single = [RewardModelScorer(rm, tok, batch_size=1)(texts[i : i + 1])[0] for i in range(3)]
    assert batched == pytest.approx(single, abs=1e-5)
    # the reward is read at the last real token: the same as an unpadded forward pass
    ids = tok(texts[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        direct = rm(input_ids=ids).logits[0, 0].item()
    assert batched[0] == pytest.approx(direct, abs=1e-5)
    # as an ExchangeScorer: the chat-template rendering, then the same scores
    assert scorer.score_exchanges(["What is 2+2?", "Say hi"], ["4", "Hello! How can I help you today?"]) == (
        pytest.approx(batched[:2], abs=1e-5)
    )
    result = preference_accuracy(scorer, PAIRS)
    assert 0 <= result["accuracy"] <= 1 and result["n"] == 3


def test_two_label_classifier_is_rejected(reward_model):
    _, tok = reward_model
    from rlft.models import resolve_model

    two = transformers.AutoModelForSequenceClassification.from_pretrained(
        resolve_model("tiny-llama").path, num_labels=2
    )
    with pytest.raises(ValueError, match="num_labels=1"):
        RewardModelScorer(two, tok)


def test_local_toxicity_classifier_reads_the_toxic_label(tmp_path):
    from rlft.eval.reward_bench import ToxicityClassifier
    from rlft.models import load_tokenizer, resolve_model

    labels = {0: "toxic", 1: "non-toxic"}  # the toxic label first, to prove it is found by name, not position
    clf = transformers.AutoModelForSequenceClassification.from_pretrained(
        resolve_model("tiny-llama").path, num_labels=2, id2label=labels, label2id={v: k for k, v in labels.items()}
    )
    clf.config.pad_token_id = load_tokenizer("tiny-llama").pad_token_id
    clf.save_pretrained(tmp_path)
    load_tokenizer("tiny-llama").save_pretrained(tmp_path)
    classifier = ToxicityClassifier(str(tmp_path))
    assert classifier.index == 0
    scores = classifier(["you are nice", "hello"])
    tok = classifier.tokenizer
    with torch.no_grad():
        expected = classifier.model(**tok(["you are nice"], return_tensors="pt")).logits.softmax(-1)[0, 0].item()
    assert scores[0] == pytest.approx(expected, abs=1e-5) and all(0 <= s <= 1 for s in scores)
    report = toxicity(["you are nice", "hello"], classifier)
    assert report["toxicity"] == pytest.approx(sum(scores) / 2)
