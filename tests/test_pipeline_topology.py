"""megatron-core groups == DeepSpeed topology groups; the pipeline stages' contents."""
import pytest


def _layout(rank, world, tp, pp):
    import torch
    from megatron_llama.config import ParallelConfig
    from pipelines.topology import build_topology, init_distributed
    device, backend = init_distributed()
    layout, _ = build_topology(ParallelConfig(tp=tp, pp=pp), 1, device)
    return backend, layout


def _wrong_topology(rank, world):
    from deepspeed.runtime.pipe.topology import ProcessTopology
    from megatron.core import parallel_state
    from pipelines.topology import TopologyMismatch, check_groups_agree, init_distributed
    init_distributed()
    parallel_state.initialize_model_parallel(2, 2, create_gloo_process_groups=False)
    # model axis outermost: TP groups {0,4}, {1,5}... instead of megatron-core's {0,1}, {2,3}...
    topo = ProcessTopology(axes=["model", "pipe", "data"], dims=[2, 2, 2])
    try:
        check_groups_agree(topo)
    except TopologyMismatch as e:
        return str(e)
    return None


def _stages(rank, world):
    from megatron_llama.config import load_config
    from pipelines.engine import TrainEngine
    from pipelines.topology import build_topology, init_distributed
    cfg = load_config(None, ["model.preset=tiny", "data.seq_len=32", "data.synthetic=true",
                             "parallel.tp=2", "parallel.pp=2", "parallel.dp=2",
                             "parallel.activation_checkpointing=full", "train.precision=fp32"])
    device, _ = init_distributed()
    layout, topo = build_topology(cfg.parallel, 1, device)
    eng = TrainEngine(cfg, layout, topo, device, lambda s: 1.0)
    module = eng.engine.module
    names = [type(f).__name__ for f in module.forward_funcs]
    ckpt = [getattr(f, "checkpointing", None) for f in module.forward_funcs]
    decay = [len(g["params"]) for g in eng.optimizer.param_groups] if hasattr(eng.optimizer, "param_groups") else []
    return layout.pp_rank, names, ckpt, module.activation_checkpoint_interval, decay


@pytest.mark.distributed
def test_groups_agree_for_tp2_pp2_dp2(dist_pool):
    out = dist_pool(8).run(_layout, 2, 2)
    for rank, (backend, lay) in enumerate(out):
        assert backend == "gloo"
        assert (lay.tp, lay.pp, lay.dp) == (2, 2, 2)
        # DeepSpeed axes (pipe, data, model), model fastest == megatron-core tp-cp-ep-dp-pp
        assert lay.tp_rank == rank % 2 and lay.dp_rank == (rank // 2) % 2 and lay.pp_rank == rank // 4
        assert lay.tp_ranks == (rank - rank % 2, rank - rank % 2 + 1)
        assert rank in lay.dp_ranks and rank in lay.pp_ranks and len(lay.pp_ranks) == 2


@pytest.mark.distributed
def test_mismatched_topology_is_an_error(dist_pool):
    msgs = dist_pool(8).run(_wrong_topology)
    assert all(m is not None for m in msgs)
    assert "groups differ" in msgs[1] and "megatron-core says" in msgs[1] and "DeepSpeed says" in msgs[1]


@pytest.mark.distributed
def test_pipeline_stages_hold_the_right_layers(dist_pool):
    out = dist_pool(8).run(_stages)
    first = [o for o in out if o[0] == 0][0]
    last = [o for o in out if o[0] == 1][0]
    assert first[1] == ["EmbeddingPipe", "TransformerBlockPipe", "TransformerBlockPipe"]
    assert last[1] == ["TransformerBlockPipe", "TransformerBlockPipe", "FinalNormPipe", "LMHeadPipe"]
    # recomputation: the blocks do it themselves; DeepSpeed's interval (which would also wrap
    # the embedding) stays off
    assert first[2] == [None, "full", "full"] and first[3] == 0


def _shared_memory_buffers(rank, world):
    import glob
    import os
    from pipelines.topology import init_distributed
    init_distributed()
    return glob.glob(f"/dev/shm/deepspeed_allreduce_buffer*_{os.environ['MASTER_PORT']}_*")


@pytest.mark.distributed
def test_cpu_runs_leave_no_shared_memory(dist_pool):
    """DeepSpeed's CPU shm all-reduce op is never built: it leaked 67 MB of /dev/shm per rank and run."""
    assert dist_pool(2).run(_shared_memory_buffers) == [[], []]
