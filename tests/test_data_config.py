import pytest

from fedexits.data import build_population, config_defaults, parse_config
from fedexits.data.config import CONFIG_CLASSES, SyntheticConfig
from fedexits.errors import SettingsError


def test_every_source_has_documented_defaults():
    for source in CONFIG_CLASSES:
        defaults = config_defaults(source)
        assert defaults["source"] == source
        assert {
            "cache_dir",
            "seed",
            "num_held_out",
            "held_out_file",
            "n_test",
            "min_images",
        } <= set(defaults)
    assert config_defaults("synthetic")["num_writers"] == 400
    assert config_defaults("imagenet_folder")["popularity_sigma"] == 10.0


def test_cache_dir_is_expanded_and_ints_accepted_for_floats():
    config = parse_config({"source": "synthetic", "cache_dir": "~/somewhere", "label_skew": 2})
    assert isinstance(config, SyntheticConfig)
    assert not config.cache_dir.startswith("~")
    assert config.label_skew == 2.0 and isinstance(config.label_skew, float)


@pytest.mark.parametrize(
    "cfg, named",
    [
        ({"source": "mnist"}, "mnist"),
        ({"source": "synthetic", "num_writer": 10}, "num_writer"),
        ({"source": "femnist_leaf", "num_writers": 10, "path": "x"}, "num_writers"),
        ({"source": "synthetic", "num_writers": "many"}, "num_writers"),
        ({"source": "synthetic", "num_writers": 1}, "num_writers"),
        ({"source": "synthetic", "style_strength": -1}, "style_strength"),
        ({"source": "synthetic", "n_test": 0}, "n_test"),
        ({"source": "synthetic", "max_test_fraction": 1.5}, "max_test_fraction"),
        ({"source": "synthetic", "seed": True}, "seed"),
        ({"source": "femnist_leaf"}, "path"),
        ({"source": "imagenet_folder", "path": "x", "held_out_file": "f.txt"}, "held_out_file"),
        ({"source": "imagenet_folder", "path": "x", "popularity_sigma": 0}, "popularity_sigma"),
    ],
)
def test_bad_config_is_a_one_line_error_naming_the_key(cfg, named):
    with pytest.raises(SettingsError) as error:
        build_population(cfg)
    assert named in str(error.value)
    assert "\n" not in str(error.value)


def test_hydra_dictconfig_is_accepted(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"source": "femnist_hub", "path": [str(tmp_path / "a.parquet")]})
    config = parse_config(cfg)
    assert config.path == [str(tmp_path / "a.parquet")]
