"""The study layer: one source of truth for settings, the typed plan, seeds, failure policy."""

import threading
from dataclasses import asdict, fields
from types import SimpleNamespace

import pytest
import torch

from fedexits.data.config import CONFIG_CLASSES
from fedexits.engine import CALIBRATION_PRESETS, PRESETS, TRAIN_PRESETS, CalibrationConfig, TrainConfig
from fedexits.models import MODEL_PRESETS, ModelConfig, build_multi_exit
from fedexits.report.records import Failure, UserRecord
from fedexits.study import LatencyProfile, RunPlan, compose_config, run_status, user_seed
from fedexits.study.config import COMPARE_NUM_USERS, INIT_PRESETS, PersonalisationSettings, SimulationConfig

# Keys the command line wires from the top-level `seed` and `cache_dir` (fedexits/conf/config.yaml).
WIRED = {"seed", "cache_dir"}


def without(values: dict, keys=WIRED) -> dict:
    return {k: v for k, v in values.items() if k not in keys}


@pytest.mark.parametrize(
    "group, presets, make",
    [
        ("model", MODEL_PRESETS, ModelConfig),
        ("global_training", TRAIN_PRESETS, TrainConfig),
        ("personalisation", PRESETS, PersonalisationSettings),
        ("calibration", CALIBRATION_PRESETS, CalibrationConfig),
    ],
)
def test_the_command_line_and_the_library_share_their_defaults(group, presets, make):
    """Every named option of a group, composed as the command line composes it, equals the
    library's dataclass with the same preset: notebooks and the CLI cannot drift apart."""
    for name, preset in presets.items():
        composed = getattr(compose_config([f"{group}={name}"]), group)
        assert without(asdict(composed)) == without(asdict(make(**preset))), (group, name)


def test_dataset_simulation_and_init_defaults_match_the_dataclasses():
    settings = compose_config([])
    for source, config_class in CONFIG_CLASSES.items():
        overrides = [f"dataset={source}"] + (["dataset.path=/data"] if source != "synthetic" else [])
        composed = asdict(compose_config(overrides).dataset)
        library = {f.name: f.default for f in fields(config_class)}
        assert without(composed, WIRED | {"path"}) == without(library, WIRED | {"path"}), source
    assert asdict(settings.simulation) == asdict(SimulationConfig())
    for name, inits in INIT_PRESETS.items():
        assert compose_config([f"init={name}"]).init.inits == inits


def test_init_compare_samples_its_users_unless_told_otherwise():
    assert compose_config(["init=compare"]).simulation.num_users == COMPARE_NUM_USERS
    assert compose_config(["init=global"]).simulation.num_users is None
    for overrides in (["init=compare", "simulation.num_users=7"], ["simulation.num_users=7", "init=compare"]):
        assert compose_config(overrides).simulation.num_users == 7
    assert compose_config(["init=compare", "simulation.num_users=null"]).simulation.num_users is None


def test_the_top_level_seed_reaches_every_section():
    settings = compose_config(["seed=7"])
    assert settings.dataset.seed == 7 and settings.global_training.seed == 7


def test_the_plan_survives_its_json_form():
    settings = compose_config(["+experiment=smoke", "init=compare", "personalisation.lr=0.02"])
    plan = RunPlan(settings, "/m.pt", {"backbone": "x"}, LatencyProfile([1.0, 2.0], [0.5, 0.5]))
    again = RunPlan.from_json(plan.to_json())
    assert again == plan and again.to_json() == plan.to_json()


def test_user_seeds_do_not_collide_across_seeds_and_rounds():
    """Arithmetic on seeds (seed + round) gave seed 0 round 2 the seed of seed 1 round 1."""
    assert user_seed(0, "u", "round", 2) != user_seed(1, "u", "round", 1)
    assert user_seed(0, "u") != user_seed(0, "v")
    assert user_seed(3, "u", "round", 1) == user_seed(3, "u", "round", 1)
    assert len({user_seed(s, "u", "round", r) for s in range(20) for r in range(20)}) == 400


def test_the_initial_weights_come_from_the_seed_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_multi_exit(backbone="femnist_mobilenet_v2", width_mult=0.25, num_exits=2, seed=5)
    assert torch.equal(torch.rand(1), expected_next)  # the global stream did not move
    b = build_multi_exit(backbone="femnist_mobilenet_v2", width_mult=0.25, num_exits=2, seed=5)
    c = build_multi_exit(backbone="femnist_mobilenet_v2", width_mult=0.25, num_exits=2, seed=6)
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    assert any(not torch.equal(t, c.state_dict()[n]) for n, t in a.state_dict().items())


def ok(user):
    return UserRecord(user, "global", result=SimpleNamespace())


def failed(user, kind="user"):
    return UserRecord(user, "global", failure=Failure(kind, f"user {user}: broken"))


def test_run_status_fails_a_run_with_no_result_too_many_failures_or_a_bug():
    assert run_status([failed("a"), failed("b")], 0.5)["reason"] == "no user has a result"
    assert run_status([], 0.5)["status"] == "failed"
    many = [ok("a"), ok("b"), failed("c")]
    assert run_status(many, 0.5)["status"] == "ok"
    assert "1 of 3 users failed (33% > simulation.max_failed_fraction=0.1)" in run_status(many, 0.1)["reason"]
    bug = run_status([ok("a"), ok("b"), ok("c"), failed("d", "bug")], 0.5)
    assert bug["status"] == "failed" and "bugs" in bug["reason"]


class SilentGrid:
    """A Grid whose clients reply to every message except those sent to `silent` nodes."""

    def __init__(self, silent):
        self.silent, self.sent = set(silent), {}

    def push_messages(self, messages):
        ids = []
        for message in messages:
            ids.append(f"m{len(self.sent)}")
            self.sent[ids[-1]] = message
        return ids

    def pull_messages(self, ids):
        replies = []
        for message_id in ids:
            if self.sent[message_id].metadata.dst_node_id not in self.silent:
                reply = SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=message_id))
                replies.append(reply)
        return replies


def test_missing_replies_at_the_deadline_are_returned_not_raised():
    from fedexits.fl.server_app import send_and_collect

    messages = [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=n)) for n in range(5)]
    replies, missing, unsent = send_and_collect(
        SilentGrid(silent={1, 3}), messages, "test", threading.Event(), max_in_flight=5, timeout_s=0.3
    )
    assert len(replies) == 3 and not unsent
    assert sorted(m.metadata.dst_node_id for m in missing) == [1, 3]
    # silent clients hold the in-flight slots: what never went out is reported apart
    replies, missing, unsent = send_and_collect(
        SilentGrid(silent={0, 1}), messages, "test", threading.Event(), max_in_flight=2, timeout_s=0.3
    )
    assert not replies and len(missing) == 2 and [m.metadata.dst_node_id for m in unsent] == [2, 3, 4]


def test_a_stopped_backend_ends_the_wait_instead_of_hanging():
    from fedexits.fl.server_app import BackendStopped, send_and_collect

    stopped = threading.Event()
    stopped.set()
    messages = [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=0))]
    with pytest.raises(BackendStopped, match="the simulation backend stopped"):
        send_and_collect(SilentGrid(silent={0}), messages, "test", stopped, timeout_s=3600)


def test_ray_joins_a_cluster_only_when_asked():
    """Ray's default address joins the latest `ray start` cluster on the machine."""
    from fedexits.fl.runtime import backend_config

    def address(*overrides):
        settings = compose_config(["+experiment=smoke", *overrides])
        prepared = SimpleNamespace(plan=SimpleNamespace(settings=settings))
        return backend_config(prepared)["init_args"]["address"]

    assert address() == "local"
    assert address("simulation.ray_address=127.0.0.1:6391") == "127.0.0.1:6391"


def test_the_global_model_is_keyed_by_the_held_out_users_not_by_the_file_path(tmp_path):
    from fedexits.models import MultiExitSpec
    from fedexits.study.prepare import global_model_path

    def path_for(lines: str, name: str):
        listed = tmp_path / name
        listed.write_text(lines)
        settings = compose_config(
            ["dataset=femnist_leaf", "dataset.path=/data", f"dataset.held_out_file={listed}"]
        )
        spec = MultiExitSpec.from_config(settings.model, 62, (1, 28, 28))
        return global_model_path(settings, spec)

    same = path_for("f001\nf002\n", "a.txt")
    assert path_for("# the same users\nf002\nf001\n", "b.txt") == same
    assert path_for("f001\nf003\n", "c.txt") != same
