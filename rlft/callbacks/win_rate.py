"""Win rate of the policy being trained against its starting self, as an evaluation callback."""

from __future__ import annotations

from rlft.callbacks.evaluation import EvaluationCallback
from rlft.generation.generator import Generator
from rlft.generation.settings import SamplingSettings
from rlft.models.modes import inference as eval_mode
from rlft.strategies import full_weights


class WinRateCallback(EvaluationCallback):
    """Win rate of the policy being trained against the **starting** policy on fixed prompts, judged by a reward
    model or a pairwise LLM judge, with a bootstrap CI. The start's answers are generated once, before the first
    optimizer step, from the same in-memory model.

    Logs ``<prefix>/win_rate``, ``<prefix>/win_rate_ci_low``, ``<prefix>/win_rate_ci_high`` and, with a reward
    model, ``<prefix>/reward`` and ``<prefix>/reward_start``.

    Args:
        prompts: Prompt file in any rlft format (e.g. held-out pairs).
        reward_model: Reward model folder (rlft ``RewardModel`` export or a sequence classifier).
        judge_model: Local judge model string (pairwise, both orders), used when ``reward_model`` is not given.
        judge_api_base: OpenAI-compatible endpoint of a judge instead of a local one.
        judge_api_model: Model name at that endpoint.
        judge_criteria: What the judge weighs, in your words (see :class:`rlft.eval.judge.Judge`).
        limit: First N prompts.
        max_new_tokens: Answer budget.
        n_bootstrap: Bootstrap resamples of the CI.
        every_n_steps: See :class:`EvaluationCallback`.
        at_fit_end: See :class:`EvaluationCallback`.
        prefix: See :class:`EvaluationCallback`.
    """

    def __init__(
        self,
        prompts: str,
        reward_model: str | None = None,
        judge_model: str | None = None,
        judge_api_base: str | None = None,
        judge_api_model: str | None = None,
        judge_criteria: str | None = None,
        limit: int = 16,
        max_new_tokens: int = 64,
        n_bootstrap: int = 1000,
        every_n_steps: int = 0,
        at_fit_end: bool = True,
        prefix: str = "eval",
    ) -> None:
        super().__init__(every_n_steps, at_fit_end, prefix)
        if not (reward_model or judge_model or judge_api_base):
            raise ValueError("WinRateCallback needs a reward_model, a judge_model or a judge_api_base to decide wins")
        from rlft.eval.data import load_records

        self.prompts = [r["prompt"] for r in load_records(prompts, kind="prompts", limit=limit)]
        self.reward_model, self.judge_model = reward_model, judge_model
        self.judge_api, self.judge_criteria = (judge_api_base, judge_api_model), judge_criteria
        self.max_new_tokens, self.n_bootstrap = max_new_tokens, n_bootstrap
        self.start_answers: list[str] | None = None
        self._scorer = self._judge = None
        self.start_rewards: list[float] | None = None

    def _answers(self, model, tokenizer) -> list[str]:
        settings = SamplingSettings(max_new_tokens=self.max_new_tokens)  # greedy: the comparison is reproducible
        return [s[0] for s in Generator(model, tokenizer).generate(self.prompts, settings)]

    def on_train_start(self, trainer, pl_module) -> None:
        if self.start_answers is None:  # on every rank, as evaluate runs (see the module docs)
            with full_weights(pl_module), eval_mode(pl_module.model):
                self.start_answers = self._answers(pl_module.model, pl_module.tokenizer)

    def evaluate(self, model, tokenizer, pl_module) -> dict[str, float]:
        from rlft.metrics import outcomes_from_scores, win_rate

        if self.start_answers is None:
            raise RuntimeError("WinRateCallback has no answers of the starting policy (on_train_start did not run)")
        answers = self._answers(model, tokenizer)
        if self.reward_model:
            from rlft.eval.reward_bench import load_reward_scorer

            self._scorer = self._scorer or load_reward_scorer(self.reward_model)
            if self.start_rewards is None:
                self.start_rewards = self._scorer.score_exchanges(self.prompts, self.start_answers)
            rewards = self._scorer.score_exchanges(self.prompts, answers)
            rate = win_rate(outcomes_from_scores(rewards, self.start_rewards), n_bootstrap=self.n_bootstrap)
            extra = {"reward": sum(rewards) / len(rewards), "reward_start": sum(self.start_rewards) / len(rewards)}
        else:
            from rlft.eval.compare import prompt_text

            verdicts = self._pairwise_judge().pairwise(
                [prompt_text(p) for p in self.prompts], answers, self.start_answers, n_bootstrap=self.n_bootstrap
            )
            if verdicts["win_rate"] is None:
                raise ValueError("the judge gave no parseable verdict on any prompt")
            rate, extra = verdicts["win_rate"], {"judge_unparseable": verdicts["unparseable"]}
        rate = rate if isinstance(rate, dict) else rate.to_dict()
        return {
            "win_rate": rate["rate"],
            "win_rate_ci_low": rate["ci_low"],
            "win_rate_ci_high": rate["ci_high"],
            **extra,
        }

    def _pairwise_judge(self):
        if self._judge is None:
            from rlft.eval.judge import Judge, LocalJudge, OpenAIJudge

            if self.judge_api[0]:
                backend = OpenAIJudge(self.judge_api[0], self.judge_api[1])
            else:
                from rlft.models import load_model, load_tokenizer

                judge = load_model(self.judge_model, trainable_adapter=False)
                backend = LocalJudge(Generator(judge, load_tokenizer(self.judge_model)), name=self.judge_model)
            self._judge = Judge(backend, criteria=self.judge_criteria)
        return self._judge
