"""The replica side of the checkpoint pause (`checkpoint.ReplicaGate`) against a real store."""


from distbelief.checkpoint import ReplicaGate


def test_a_request_made_before_the_replica_started_is_still_answered(store):
    # a time-based checkpoint may be asked for while the replicas are still loading their
    # data; the coordinator waits for every replica to pause, so a late one must pause too
    store.set_json("ckpt/request", 1)
    gate = ReplicaGate(store, "0", timeout=5, period=0)
    assert gate.due() == 1


def test_no_request_means_no_pause(store):
    gate = ReplicaGate(store, "0", timeout=5, period=0)
    assert gate.due() is None


def test_a_finished_checkpoint_is_not_answered_again(store):
    store.set_json("ckpt/request", 2)
    store.set_json("ckpt/2/go", True)  # a replacement replica starts after checkpoint 2
    gate = ReplicaGate(store, "0", timeout=5, period=0)
    assert gate.due() is None
    store.set_json("ckpt/request", 3)
    assert gate.due() == 3


def test_pause_records_the_steps_and_returns_on_go(store):
    store.set_json("ckpt/request", 1)
    gate = ReplicaGate(store, "1.0", timeout=5, period=0)
    store.set_json("ckpt/1/go", True)
    gate.pause(1, 40)
    assert store.get_json("ckpt/1/paused/1.0") == {"steps": 40}
    assert gate.due() is None
