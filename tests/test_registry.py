"""The model registry on real files, with real concurrent writers on Ray."""

import io
import json
import os

import pytest
import ray
import torch

from rayline import cli
from rayline.store import ModelRegistry, RegistryError


def torch_bytes(value: float) -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.full((3,), value)}, buffer)
    return buffer.getvalue()


def test_round_trip_versions_and_aliases(tmp_path):
    registry = ModelRegistry(str(tmp_path / "store"))
    v1 = registry.register(
        "policy",
        {"policy.pt": torch_bytes(1.0)},
        kind="dqn",
        metrics={"return": 200.0},
        config={"lr": 0.001},
        data_fingerprint="sha256:abc",
        run={"trial": "t1"},
    )
    v2 = registry.register(
        "policy", {"policy.pt": torch_bytes(2.0)}, kind="dqn", metrics={"return": 500.0}
    )
    assert (v1.version, v2.version) == (1, 2)
    assert registry.versions("policy") == [1, 2]
    got = registry.get("policy", 1)
    assert got.metrics == {"return": 200.0} and got.config == {"lr": 0.001}
    assert got.data_fingerprint == "sha256:abc" and got.run == {"trial": "t1"} and got.kind == "dqn"
    assert got.rayline_version and got.created_at
    state = torch.load(io.BytesIO(registry.read_file(got, "policy.pt")), weights_only=True)
    assert torch.equal(state["w"], torch.full((3,), 1.0))
    assert registry.get("policy").version == 2  # latest

    registry.promote("policy", 1)
    assert registry.get("policy", "production").version == 1
    registry.promote("policy", 2)
    assert registry.get("policy", "production").version == 2
    registry.promote("policy", "production", alias="staging")
    assert registry.aliases("policy") == {"production": 2, "staging": 2, "latest": 2}
    assert [m.version for m in registry.list()] == [1, 2]


def test_lookup_errors_are_clear(tmp_path):
    registry = ModelRegistry(str(tmp_path))
    with pytest.raises(RegistryError, match="model 'ghost' is not registered"):
        registry.get("ghost")
    registry.register("m", {"a.json": b"{}"}, kind="test")
    with pytest.raises(RegistryError, match="has no version 7"):
        registry.get("m", 7)
    with pytest.raises(RegistryError, match="has no alias 'production'"):
        registry.get("m", "production")
    with pytest.raises(RegistryError, match="cannot be set"):
        registry.promote("m", 1, alias="latest")
    with pytest.raises(RegistryError, match="bad model name"):
        registry.register("../escape", {"a.json": b"{}"}, kind="test")
    with pytest.raises(RegistryError, match="bad artifact file name"):
        registry.register("m", {"../x": b"{}"}, kind="test")


def test_missing_or_corrupted_metadata_names_the_path(tmp_path):
    registry = ModelRegistry(str(tmp_path))
    registry.register("m", {"a.json": b"{}"}, kind="test")
    registry.register("m", {"a.json": b"{}"}, kind="test")
    meta1 = tmp_path / "models" / "m" / "1" / "metadata.json"
    meta1.write_text("{not json")
    with pytest.raises(RegistryError, match=f"{meta1}: corrupted metadata.json"):
        registry.get("m", 1)
    meta2 = tmp_path / "models" / "m" / "2" / "metadata.json"
    os.remove(meta2)
    with pytest.raises(RegistryError, match=f"{meta2}: metadata.json is missing"):
        registry.get("m", 2)


def hostile_store(tmp_path):
    """A store with model m (v1 promoted) whose files the tests then spoil."""
    registry = ModelRegistry(str(tmp_path))
    registry.register("m", {"w.json": b"[1, 2]"}, kind="test")
    registry.promote("m", 1)
    return registry, tmp_path / "models" / "m"


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        # A number past float's range: json reads inf, int(inf) raises OverflowError.
        (
            lambda m: (m / "aliases" / "production.json").write_text('{"version": 1e999}'),
            r"production.json: corrupted alias file \(version inf",
        ),
        (
            lambda m: (m / "aliases" / "production.json").write_text('{"version": true}'),
            "expected a whole number",
        ),
        (
            lambda m: (m / "aliases" / "production.json").write_text('{"version": "1"}'),
            "expected a whole number",
        ),
        (
            lambda m: (m / "aliases" / "production.json").write_text("[" * 100_000 + "]" * 100_000),
            "RecursionError",
        ),
        (
            lambda m: (m / "aliases" / "production.json").write_bytes(b"\xff\xfe{}"),
            "corrupted alias file",
        ),
        (
            lambda m: (m / "aliases" / "production.json").write_bytes(b" " * (2 << 20)),
            r"production.json: over 1048576 bytes",
        ),
    ],
)
def test_a_spoiled_alias_file_is_a_registry_error_naming_it(tmp_path, spoil, message):
    registry, model = hostile_store(tmp_path)
    spoil(model)
    with pytest.raises(RegistryError, match=message):
        registry.get("m", "production")
    aliases, problems = registry.aliases_checked("m")
    assert "production" not in aliases and len(problems) == 1 and "production" in problems[0]


def metadata_with(model, **changes):
    path = model / "1" / "metadata.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda m: metadata_with(m, name="other"), "names model 'other', not its folder's 'm'"),
        (
            lambda m: metadata_with(m, files={"../../../etc/passwd": "0" * 64}),
            "bad artifact file name '../../../etc/passwd'",
        ),
        (lambda m: metadata_with(m, files={"w.json\n": "0" * 64}), "bad artifact file name"),
        (lambda m: metadata_with(m, files={"w.json": 5}), "bad sha256 for 'w.json'"),
        (lambda m: metadata_with(m, files=["w.json"]), "corrupted metadata.json"),
        (
            lambda m: (m / "1" / "metadata.json").write_text('{"a":' * 50_000 + "1" + "}" * 50_000),
            "RecursionError",
        ),
        (lambda m: (m / "1" / "metadata.json").write_text("[]"), "corrupted metadata.json"),
    ],
)
def test_spoiled_metadata_is_a_registry_error_naming_the_file(tmp_path, spoil, message):
    registry, model = hostile_store(tmp_path)
    spoil(model)
    with pytest.raises(RegistryError, match=message) as caught:
        registry.get("m", 1)
    assert str(model / "1" / "metadata.json") in str(caught.value)


def test_links_out_of_the_store_are_refused(tmp_path):
    """A store's files are its own: an artifact, an alias or a whole version folder that
    is a symbolic link (to a secret elsewhere on the machine) is refused, named."""
    secret = tmp_path / "outside.json"
    secret.write_text('{"version": 1}')
    registry, model = hostile_store(tmp_path / "store")
    alias = model / "aliases" / "production.json"
    alias.unlink()
    alias.symlink_to(secret)
    with pytest.raises(RegistryError, match="production.json: a symbolic link"):
        registry.get("m", "production")
    artifact = model / "1" / "w.json"
    artifact.unlink()
    artifact.symlink_to(secret)
    with pytest.raises(RegistryError, match="w.json: a symbolic link"):
        registry.read_file(registry.get("m", 1), "w.json")
    (model / "2").symlink_to(model / "1", target_is_directory=True)
    with pytest.raises(RegistryError, match="2: a symbolic link"):
        registry.get("m", 2)


def test_names_with_a_trailing_newline_are_refused(tmp_path):
    registry = ModelRegistry(str(tmp_path))
    with pytest.raises(RegistryError, match="bad model name"):
        registry.register("m\n", {"w.json": b"[]"}, kind="test")
    registry.register("m", {"w.json": b"[]"}, kind="test")
    with pytest.raises(RegistryError, match="bad alias"):
        registry.promote("m", 1, alias="production\n")


def test_every_models_verb_meets_a_spoiled_alias_with_a_line_and_exit_2(tmp_path, capsys):
    """`{"version": 1e999}` in an alias file crashed `rayline models promote` with a
    traceback: now each verb that reads it says which file and exits 2."""
    registry, model = hostile_store(tmp_path)
    registry.register("m", {"w.json": b"[3]"}, kind="test")
    (model / "aliases" / "production.json").write_text('{"version": 1e999}')
    store = str(tmp_path)
    for argv in (
        ["show", "m", "production"],
        ["promote", "m", "production", "--alias", "staging"],
        ["compare", "m", "production", "2"],
    ):
        assert cli.main(["models", "--store", store, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert "production.json: corrupted alias file" in err and "Traceback" not in err, argv
    # promote onto the spoiled alias: the move writes a good file over it
    assert cli.main(["models", "--store", store, "promote", "m", "2"]) == 0
    assert registry.get("m", "production").version == 2


def test_tampered_artifact_is_detected(tmp_path):
    registry = ModelRegistry(str(tmp_path))
    mv = registry.register("m", {"w.json": b"[1, 2]"}, kind="test")
    (tmp_path / "models" / "m" / "1" / "w.json").write_bytes(b"[6, 6]")
    with pytest.raises(RegistryError, match="do not match metadata.json's hash"):
        registry.read_file(mv, "w.json")


def test_unusable_store_uris(tmp_path):
    with pytest.raises(RegistryError, match="cannot be written"):
        ModelRegistry("/proc/rayline-store")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(RegistryError, match="is a file, not a directory"):
        ModelRegistry(str(a_file))
    with pytest.raises(RegistryError, match="cannot be opened"):
        ModelRegistry("nosuchscheme://bucket/path")
    with pytest.raises(RegistryError, match="does not exist"):
        ModelRegistry(str(tmp_path / "absent"), create=False)
    assert ModelRegistry(f"file://{tmp_path}/via-uri").names() == []


@ray.remote(num_cpus=0.25)
def register_one(store: str, index: int) -> int:
    registry = ModelRegistry(store)
    body = json.dumps({"writer": index}).encode()
    return registry.register(
        "shared", {"model.json": body}, kind="test", metrics={"writer": index}
    ).version


def test_concurrent_registration_gives_distinct_versions(ray_session, tmp_path):
    store = str(tmp_path / "store")
    versions = ray.get([register_one.remote(store, i) for i in range(8)])
    assert sorted(versions) == list(range(1, 9))
    registry = ModelRegistry(store)
    writers = set()
    for mv in registry.list("shared"):
        body = json.loads(registry.read_file(mv, "model.json"))
        assert body["writer"] == mv.metrics["writer"]  # files and metadata belong together
        writers.add(body["writer"])
    assert writers == set(range(8))
    folder = tmp_path / "store" / "models" / "shared"
    leftovers = [n for n in os.listdir(folder) if not n.isdigit() and n != "history"]
    assert leftovers == []
    # Every registration is in the history, once, whole, with who made it.
    registered = [e for e in registry.history("shared") if e["event"] == "registered"]
    assert sorted(e["version"] for e in registered) == list(range(1, 9))
    assert {e["metrics"]["writer"] for e in registered} == set(range(8))
    assert all(e["who"]["host"] and e["who"]["user"] for e in registered)


@ray.remote(num_cpus=0.25)
def promote_many(store: str, writer: int, times: int) -> None:
    registry = ModelRegistry(store)
    for i in range(times):
        registry.promote("m", 1 + (writer + i) % 2, alias=f"a{writer}")


def test_the_history_keeps_every_event_of_concurrent_writers(ray_session, tmp_path):
    """Alias moves from four processes at once: none is lost or torn; the history is in
    time order, `models history` prints it (and --json one object per line), `models
    list` says since when each alias holds its version, and a corrupt event file is
    listed as unreadable, not skipped."""
    store = str(tmp_path / "store")
    registry = ModelRegistry(store)
    registry.register("m", {"a.json": b"{}"}, kind="test")
    registry.register("m", {"a.json": b"{}"}, kind="test")
    ray.get([promote_many.remote(store, writer, 10) for writer in range(4)])
    events = registry.history("m")
    moves = [e for e in events if e["event"] == "promoted"]
    assert len(moves) == 40 and [e["time"] for e in events] == sorted(e["time"] for e in events)
    for writer in range(4):
        mine = [e for e in moves if e["alias"] == f"a{writer}"]
        assert [e["version"] for e in mine] == [1 + (writer + i) % 2 for i in range(10)]
        assert [e["previous"] for e in mine] == [None] + [e["version"] for e in mine[:-1]]
    folder = tmp_path / "store" / "models" / "m" / "history"
    (folder / "00000000000000000000-torn.json").write_text('{"event": "prom')
    assert registry.history("m")[0]["event"] == "unreadable"
    assert registry.alias_since("m")["a0"] == [e for e in moves if e["alias"] == "a0"][-1]["time"]


def test_models_history_and_list_on_the_command_line(tmp_path, capsys):
    store = str(tmp_path)
    registry = ModelRegistry(store)
    registry.register("m", {"a.json": b"{}"}, kind="dqn")
    registry.register("m", {"a.json": b"{}"}, kind="dqn")
    registry.promote("m", 1)
    registry.promote("m", 2)
    assert cli.main(["models", "history", "m", "--store", store]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[1] for line in lines] == ["registered"] * 2 + ["promoted"] * 2
    assert "production -> v2 (was v1)" in lines[-1]
    assert cli.main(["models", "history", "m", "--json", "--store", store]) == 0
    parsed = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert parsed[-1]["event"] == "promoted" and parsed[-1]["previous"] == 1
    assert cli.main(["models", "list", "--store", store]) == 0
    (v2,) = [line for line in capsys.readouterr().out.splitlines() if "\tv2\t" in line]
    assert f"production (since {parsed[-1]['time']})" in v2
    assert cli.main(["models", "history", "nope", "--store", store]) == 2


def test_models_cli(tmp_path, capsys):
    store = str(tmp_path)
    registry = ModelRegistry(store)
    registry.register("p", {"a.json": b"{}"}, kind="dqn", metrics={"r": 1})
    registry.register("p", {"a.json": b"{}"}, kind="dqn", metrics={"r": 2})
    assert cli.main(["models", "--store", store, "promote", "p", "1"]) == 0
    assert "production -> p v1" in capsys.readouterr().out
    assert cli.main(["models", "--store", store, "list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split("\t")[:2] == ["p", "v1"] and "\tproduction (since 20" in lines[0]
    assert lines[1].endswith("latest")
    assert cli.main(["models", "--store", store, "show", "p", "production"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == {"r": 1}
    assert cli.main(["models", "--store", store, "show", "p", "9"]) == 2
    assert "has no version 9" in capsys.readouterr().err
    assert cli.main(["models", "--store", str(tmp_path / "nowhere"), "list"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_an_alias_follower_outlives_a_spoiled_alias_and_follows_once_it_is_fixed(tmp_path):
    """The follower's task died on `{"version": 1e999}` and the model stayed on its
    version for good. Now it keeps what it holds, lists the file as the problem, and
    follows the alias again once the file is fixed."""
    import asyncio

    from rayline.serving.following import Following

    class Held:
        def __init__(self, registry, name, version):
            self.version = registry.get(name, version)

    registry, model = hostile_store(tmp_path)
    registry.register("m", {"w.json": b"[3]"}, kind="test")
    following = Following(registry, "m", Held, "production", poll_s=0.01)
    following.load()
    assert following.current.version.version == 1 and following.problems() == []
    alias = model / "aliases" / "production.json"

    async def scenario():
        task = asyncio.get_running_loop().create_task(following.follow())
        alias.write_text('{"version": 1e999}')
        await asyncio.sleep(0.2)
        assert not task.done()
        assert following.current.version.version == 1
        (problem,) = following.problems()
        assert (
            problem["version"] is None and "production.json: corrupted alias" in problem["reason"]
        )
        alias.write_text('{"version": 2}')
        await asyncio.sleep(0.2)
        assert following.current.version.version == 2
        assert following.problems() == []
        task.cancel()

    asyncio.run(scenario())
