import pytest

from legonet.config import KMeansConfig, LegoConfig
from legonet.errors import ConfigError


def test_defaults_are_the_paper_setting():
    c = LegoConfig()
    assert c.block == (4, 4) and c.clusters == 32 and c.scope == "model"


def test_int_block_and_round_trip():
    c = LegoConfig(block=2, clusters=16, scope="layer", kmeans={"max_iters": 5})
    assert c.block == (2, 2) and c.kmeans.max_iters == 5
    assert LegoConfig.from_dict(c.to_dict()) == c
    g = LegoConfig(scales="row", scale_stat="absmax", unshrink=True)
    assert LegoConfig.from_dict(g.to_dict()) == g


@pytest.mark.parametrize("bad", [
    {"clusters": 0}, {"clusters": 70000}, {"clusters": 2.5}, {"block": 0}, {"block": (4,)},
    {"block": "4"}, {"scope": "global"}, {"seed": -1}, {"codebook_dtype": "int8"},
    {"include": [""]}, {"kmeans": {"init": "kmeans||"}}, {"kmeans": {"tol": 2}},
    {"scales": "row", "scale_stat": "max"}, {"scales": "row", "unshrink": 1},
    # the gain options mean nothing without gains
    {"scale_stat": "absmax"}, {"unshrink": True},
])
def test_rejects_impossible_values(bad):
    with pytest.raises(ConfigError):
        LegoConfig.from_dict(bad)


def test_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown legonet config key"):
        LegoConfig.from_dict({"clusterz": 4})
    with pytest.raises(ConfigError, match="unknown kmeans config key"):
        KMeansConfig.from_dict({"iters": 4})
