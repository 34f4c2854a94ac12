from setuptools import find_packages, setup

setup(
    name="megatron-llama",
    version="0.1.0",
    description="3D-parallel LLaMA pretraining: megatron-core tensor parallelism x DeepSpeed pipeline/ZeRO",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_llama*", "pipelines*", "launch*", "checkpoints_tools*"]),
    install_requires=[
        "torch>=2.4,<=2.14.1",
        "deepspeed==0.19.8",
        "megatron-core==0.16.1",
        "sentencepiece>=0.2",
        "tokenizers==0.23.3",  # tokenizer.json (Llama 3, Qwen2, Mistral), byte-level BPE training
        "protobuf",  # sentencepiece_model_pb2: a trained tokenizer file without machine-specific fields
        "wandb",
        "pyyaml",
        "numpy",
        "tqdm",
        "ninja",
        "zstandard",
    ],
    extras_require={
        "dev": ["pytest", "pytest-xdist", "hypothesis", "transformers", "safetensors", "matplotlib", "tensorboard",
                "lm-eval==0.4.13", "tiktoken==0.14.0",
                "trl==1.16.0"],  # trl: the DPO reference (tests/test_dpo_parity.py)
        "tensorboard": ["tensorboard"],  # train.tensorboard_dir
        "plot": ["matplotlib"],          # mllama-plot
        "eval": ["lm-eval==0.4.13"],     # mllama-eval, train.eval_tasks (lm-evaluation-harness)
        "meta": ["tiktoken==0.14.0"],    # Meta's Llama 3 tokenizer.model with tiktoken itself (tests compare)
        # mllama-bench --baseline torchtitan,torchtitan-fp8 (0.3 needs a newer torch than 2.11)
        "bench": ["torchtitan==0.2.2", "torchao==0.18.0", "transformers", "matplotlib"],
    },
    entry_points={
        "console_scripts": [
            "mllama-train=launch.train:main",
            "mllama-preprocess=megatron_llama.data.preprocess_cli:main",
            "mllama-tokenizer=megatron_llama.data.tokenizer_cli:main",
            "mllama-convert=checkpoints_tools.convert:main",
            "mllama-bench=launch.bench:main",
            "mllama-plot=launch.plot:main",
            "mllama-eval=launch.eval:main",
            "mllama-rs=launch.rejection_sampling:main",
        ],
    },
)
