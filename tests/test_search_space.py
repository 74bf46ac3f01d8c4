"""A search space in Hydra's sweeper syntax (hydra.sweeper.params): each entry read as a Param the sampler draws,
or as a fixed override; and what is wrong with a space, named per entry, before anything runs: its syntax, its key
(a key of the training config or a config group), and its bounds (values the key allows)."""

import pytest
from omegaconf import OmegaConf
from optuna.trial import FixedTrial

from helpers.config import CONF
from vaelab.errors import ConfigError
from vaelab.search.config import compose_config, config_groups
from vaelab.search.space import (
    SWEEPER_PARAMS,
    Param,
    SweeperSpace,
    sweeper_entries,
    sweeper_space,
    sweeper_space_problems,
)

# The default search space, as the sweeper plugin takes it.
DEFAULT_SPACE = {
    "model.latent_dim": "int(tag(log, interval(2, 64)))",
    "objective.beta": "tag(log, interval(0.25, 4.0))",
    "optim.lr": "tag(log, interval(1.0e-4, 3.0e-3))",
    "arch.hidden": "choice([256], [512], [512, 256])",
}


@pytest.fixture(scope="module")
def cfg():
    return compose_config(CONF, [])


@pytest.fixture(scope="module")
def groups():
    return config_groups(CONF)


def read(expression: object, name: str = "key") -> Param:
    [param] = sweeper_space({name: expression}).params
    return param


def test_an_int_interval_with_the_log_tag_is_a_log_scaled_integer_parameter():
    assert read("int(tag(log, interval(2, 64)))", "model.latent_dim") == Param(
        "model.latent_dim", "int", 2, 64, log=True
    )


@pytest.mark.parametrize(
    ("expression", "kind", "low", "high", "log", "step"),
    [
        ("interval(2, 64)", "float", 2.0, 64.0, False, None),  # Hydra reads interval bounds as floats
        ("int(interval(2, 64))", "int", 2, 64, False, None),
        ("tag(log, interval(0.25, 4.0))", "float", 0.25, 4.0, True, None),
        ("int(tag(log, interval(2, 64)))", "int", 2, 64, True, None),
        ("range(1, 10, 3)", "int", 1, 7, False, 3),  # stop is exclusive: 1, 4, 7
        ("range(1, 10)", "int", 1, 9, False, 1),
        ("range(4)", "int", 0, 3, False, 1),
        ("range(0.5, 2, 0.5)", "float", 0.5, 1.5, False, 0.5),
        ("range(0.1, 0.5, 0.1)", "float", 0.1, 0.4, False, 0.1),  # the last value in decimal, not 0.4000000000000001
        ("range(10, 1, -3)", "int", 4, 10, False, 3),  # 10, 7, 4: the same values ascending
    ],
)
def test_each_numeric_sweep_is_a_parameter_with_its_bounds_scale_and_step(expression, kind, low, high, log, step):
    param = read(expression)
    assert (param.kind, param.low, param.high, param.log, param.step) == (kind, low, high, log, step)
    assert type(param.low) is type(low) and type(param.high) is type(high)


@pytest.mark.parametrize(
    ("expression", "choices", "texts"),
    [
        ("choice(mlp, conv, resnet)", ("mlp", "conv", "resnet"), ("mlp", "conv", "resnet")),
        ("mlp,conv", ("mlp", "conv"), ("mlp", "conv")),  # the simple form
        ("choice(1, 2.5, true)", (1, 2.5, True), ("1", "2.5", "true")),
        ("choice([256], [512, 256])", ("[256]", "[512,256]"), ("[256]", "[512,256]")),  # lists as override text
        ("choice('a b', c)", ("a b", "c"), ("'a b'", "c")),
    ],
)
def test_each_choice_is_a_categorical_parameter_that_optuna_can_store(expression, choices, texts):
    assert read(expression) == Param("key", "categorical", choices=choices, texts=texts)


def test_a_list_choice_suggests_the_list_as_an_override():
    param = read("choice([256], [512], [512, 256])", "arch.hidden")
    assert param.suggest(FixedTrial({"arch.hidden": "[512,256]"})) == "arch.hidden=[512,256]"


def test_a_sampled_interval_is_an_override_of_the_sampled_value():
    param = read("int(tag(log, interval(2, 64)))", "model.latent_dim")
    assert param.suggest(FixedTrial({"model.latent_dim": 8})) == "model.latent_dim=8"


def test_plain_values_are_fixed_overrides_in_the_order_given():
    space = sweeper_space(
        {
            "trainer.max_epochs": 5,
            "objective.beta": "tag(log, interval(0.25, 4.0))",
            "optim.lr": "0.001",
            "arch.hidden": [512, 256],
            "data": "digits",
            "eval.limit": None,
            "compile": True,
        }
    )
    assert space == SweeperSpace(
        params=[Param("objective.beta", "float", 0.25, 4.0, log=True)],
        fixed=[
            "trainer.max_epochs=5",
            "optim.lr=0.001",
            "arch.hidden=[512,256]",
            "data=digits",
            "eval.limit=null",
            "compile=true",
        ],
    )


def test_nested_and_dotted_keys_name_the_same_config_key():
    nested = OmegaConf.create({"model": {"latent_dim": "int(interval(2, 8))"}, "optim.lr": "interval(0.001, 0.01)"})
    assert sweeper_entries(nested) == {"model.latent_dim": "int(interval(2, 8))", "optim.lr": "interval(0.001, 0.01)"}
    assert sweeper_entries({"model": {"latent_dim": 4}, "arch.hidden": [512, 256]}) == {
        "model.latent_dim": 4,
        "arch.hidden": [512, 256],
    }
    assert sweeper_entries(None) == {}


def test_the_sweepers_params_read_from_a_composed_config_are_its_entries():
    cfg = OmegaConf.create({"hydra": {"sweeper": {"params": DEFAULT_SPACE}}})
    assert sweeper_entries(OmegaConf.select(cfg, SWEEPER_PARAMS)) == DEFAULT_SPACE


def test_the_default_space_in_sweeper_syntax_is_valid(cfg, groups):
    space = {**DEFAULT_SPACE, "arch": "choice(mlp, conv, resnet)", "trainer.max_epochs": "range(1, 10, 3)"}
    assert sweeper_space_problems(cfg, space, groups) == []
    assert [param.name for param in sweeper_space(space).params] == list(space)


@pytest.mark.parametrize(
    ("name", "expression", "allowed"),
    [
        # syntax: not valid, or not a distribution this sweeper samples
        ("objective.beta", "interval(0.25,", "Hydra's sweeper syntax"),
        ("objective.beta", "interval(a, b)", "Hydra's sweeper syntax"),
        ("arch", "glob(*)", "a distribution this sweeper knows"),
        ("objective.beta", "tag(log, interval(-1, 4))", "a low bound > 0 on a log scale (a log scale starts above 0)"),
        ("objective.beta", "interval(4, 1)", "a low bound <= the high bound"),
        ("objective.beta", "interval(0, inf)", "finite bounds"),
        ("objective.beta", "tag(uniform, interval(0.5, 2))", "no tag but log"),
        ("trainer.max_epochs", "tag(log, range(1, 10))", "a stepped scale is not a log scale"),
        ("trainer.max_epochs", "range(10, 1)", "a range that yields a value"),
        ("trainer.max_epochs", "range(1, 10, 0)", "a step other than 0"),
        ("trainer.max_epochs", "shuffle(range(1, 10))", "a range without shuffle"),
        ("arch", "tag(log, choice(mlp, conv))", "a choice without tags"),
        ("objective.beta", "1, interval(0.5, 2)", "a sweep inside a choice is not sampled"),
        ("objective.beta", "choice(choice(1, 2), 3)", "a sweep inside a choice is not sampled"),
        ("arch.hidden", "[interval(1, 2)]", "a sweep inside a value is not sampled"),
        # the key: one of the training config, or a config group
        ("model.latnt_dim", "int(interval(2, 8))", "a key of the training config"),
        ("model", "int(interval(2, 8))", "a key of the training config"),  # a section, not a key
        ("search.n_trials", "range(1, 3)", "a key of the training config"),
        ("hydra.job.name", "choice(a, b)", "a key of the training config"),
        ("arch", "int(interval(1, 3))", "a choice of options: arch is a config group"),
        ("arch", "choice(mlp, transformer)", "options of the config group arch: ['conv', 'mlp', 'mlp2', 'resnet']"),
        # the bounds: values the key allows
        (
            "model.latent_dim",
            "int(interval(0, 8))",
            "a low bound the key allows: an integer >= 1 (what model.latent_dim",
        ),
        ("model.latent_dim", "range(-4, 0, 2)", "low and high bounds the key allows: an integer >= 1"),
        ("model.latent_dim", "interval(2, 64)", "integer bounds, as int(interval(...)) or int(range(...))"),
        ("optim.lr", "interval(0, 0.01)", "a low bound the key allows: a number > 0 (what optim.lr allows)"),
        ("arch.hidden", "choice([512], 3)", "choices the key allows, not 3: a non-empty list of integers"),
        ("nan_policy", "fail,explode", "choices the key allows, not explode: one of ['fail', 'skip']"),
    ],
)
def test_a_bad_entry_is_one_problem_naming_its_key_its_expression_and_what_is_allowed(
    cfg, groups, name, expression, allowed
):
    [(key, value, found)] = sweeper_space_problems(cfg, {name: expression}, groups)
    assert (key, value) == (f"{SWEEPER_PARAMS}.{name}", expression)
    assert allowed in found


def test_each_distinct_issue_of_an_entry_is_its_own_problem(cfg, groups):
    found = sweeper_space_problems(cfg, {"objective.beta": "tag(log, interval(0, -1))"}, groups)
    assert [allowed for _, _, allowed in found] == [
        "a low bound <= the high bound (-1.0)",
        "a low bound > 0 on a log scale (a log scale starts above 0)",
    ]


def test_a_plain_yaml_value_is_named_by_its_override_text(cfg, groups):
    [(key, value, _)] = sweeper_space_problems(cfg, {"model.latnt_dim": [2, 4]}, groups)
    assert (key, value) == ("hydra.sweeper.params.model.latnt_dim", "[2,4]")


def test_every_bad_entry_is_named_before_anything_runs(cfg, groups):
    space = {
        **DEFAULT_SPACE,
        "objective.beta": "tag(log, interval(-1, 4))",
        "model.latent_dim": "int(interval(0, 8))",
        "model.latnt_dim": "int(interval(2, 8))",
        "arch": "choice(mlp, transformer)",
    }
    keys = [key for key, _, _ in sweeper_space_problems(cfg, space, groups)]
    assert keys == [
        f"{SWEEPER_PARAMS}.{name}" for name in ("model.latent_dim", "objective.beta", "model.latnt_dim", "arch")
    ]


def test_reading_a_space_refuses_bad_syntax_naming_every_such_entry():
    with pytest.raises(ConfigError) as raised:
        sweeper_space({"objective.beta": "tag(log, interval(-1, 4))", "arch": "glob(*)", "optim.lr": "0.001"})
    assert [key for key, _, _ in raised.value.problems] == [
        "hydra.sweeper.params.objective.beta",
        "hydra.sweeper.params.arch",
    ]
