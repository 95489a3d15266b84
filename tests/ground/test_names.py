import pytest

from ground.errors import ConfigError
from ground.names import NameRegistry


def test_register_lookup_aliases_and_iteration():
    reg = NameRegistry("KL estimator")

    @reg.register("k3", aliases=("low_var_kl",))
    def k3():
        return 3

    reg.add("k1", lambda: 1)
    assert k3() == 3 and reg["k3"] is k3 and reg["low_var_kl"] is k3
    assert list(reg) == ["k3", "k1"] and len(reg) == 2 and "low_var_kl" in reg and "k2" not in reg
    assert reg.canonical("low_var_kl", "algorithm.kl_penalty") == "k3"


def test_duplicate_name_or_alias_is_an_error():
    reg = NameRegistry("policy loss")
    reg.add("vanilla", 1, aliases=("ppo",))
    for name in ("vanilla", "ppo"):
        with pytest.raises(ValueError, match=f"policy loss '{name}' is registered twice"):
            reg.add(name, 2)


def test_unknown_name_names_the_key_and_every_valid_name():
    reg = NameRegistry("advantage estimator")
    reg.add("grpo", 1)
    reg.add("gae", 2, aliases=("ppo_gae",))
    with pytest.raises(ConfigError, match=r"algorithm.adv_estimator='grpoo': no advantage estimator has that name; "
                                          r"valid: grpo, gae, ppo_gae, dapo \(= grpo\)\. "
                                          r"Did you mean algorithm.adv_estimator=grpo\?"):
        reg.canonical("grpoo", "algorithm.adv_estimator", extra_valid=("dapo (= grpo)",))
    with pytest.raises(ConfigError, match="actor.loss_mode='nope': no advantage estimator"):
        reg.lookup("nope", "actor.loss_mode")
