"""Online-RL machinery below the methods: rollouts (:mod:`~rlft.rl.rollout`), reward sources
(:mod:`~rlft.rl.rewards`), answer extraction shared with evaluation (:mod:`~rlft.rl.answers`) and the code
sandbox (:mod:`~rlft.rl.sandbox`)."""
