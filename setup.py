from setuptools import find_packages, setup

setup(
    name="spoco-vol",
    version="0.1.0",
    description="Instance segmentation of large microscopy volumes from sparse annotations (SPOCO)",
    packages=find_packages(include=["spoco_vol", "spoco_vol.*"]),
    package_data={"spoco_vol": ["data/*.pt", "data/*.npz", "data/*.md"]},
    # the shipped cluster configs (spoco_vol.cluster looks beside the package, then in ./cluster_configs)
    data_files=[("cluster_configs", ["cluster_configs/local.yaml", "cluster_configs/slurm.yaml",
                                     "cluster_configs/gateway.yaml"])],
    python_requires=">=3.10",
    install_requires=[
        # CPU build from local disk here; on a GPU machine install torch first (see README).
        "torch==2.13.0",
        "numpy",
        "scipy",
        "zarr>=3",
        "numcodecs",
        "dask",
        "distributed",
        "scikit-image",
        "click",
        "fastremap",
        "bioimage-cpp>=0.10",
        "tqdm",
        "matplotlib",
        "pyyaml",
        "dask-jobqueue",   # SLURM workers (--cluster slurm)
        "dask-gateway",    # daskhub workers (--cluster gateway)
        "scikit-learn",    # mean-shift (--clustering meanshift, consistency)
        "hdbscan",         # --clustering hdbscan (scikit-learn's fails with an epsilon on NumPy 2)
    ],
    # ome-zarr: the OME-Zarr reader napari-ome-zarr is built on (the output's reader check);
    # dask-gateway-server: a real gateway for the daskhub end-to-end test
    extras_require={"test": ["pytest", "ome-zarr", "dask-gateway-server[local]"]},
    entry_points={"console_scripts": ["spoco-vol=spoco_vol.cli:main"]},
)
