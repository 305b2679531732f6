#!/usr/bin/env bash
# Fill wheelhouse/ (git-ignored) with what the GPU machines' image lacks for the suite, for its
# Python (CPython 3.12, manylinux x86_64), on a machine with network: mlflow, optuna, fvcore,
# tomli-w and their requirements that the image does not have (benchmarks/gpu_image_packages.txt
# lists what it has). benchmarks/gpu_check.sh installs them there with pip --no-index. Then it checks that
# every requirement of every wheel is met by the wheelhouse or the image, and the size (< 60 MiB).
#
#   bash benchmarks/gpu_wheels.sh [DIR]        # default: wheelhouse
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-wheelhouse}
py=${PYTHON:-python3}
mkdir -p "$dest"

# pinned: the versions this project is tested with (tox), each with a cp312/manylinux wheel
wheels=(
    mlflow==3.17.2 mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 optuna==5.0.0
    alembic==1.20.1 annotated-types==0.8.0 blinker==1.9.0 cachetools==7.3.3 cffi==2.1.1
    colorlog==6.12.0 cryptography==50.0.2 databricks-sdk==0.162.0 docker==7.2.0
    fastapi==0.165.0 flask==3.1.3 flask-cors==6.0.5 gitdb==4.0.12 gitpython==3.2.1
    google-auth==2.63.0 graphene==3.4.3 graphql-core==3.2.14 graphql-relay==3.2.0
    gunicorn==26.2.0 huey==3.5.4 importlib-metadata==9.1.0 itsdangerous==2.2.0
    mako==1.4.3 opentelemetry-api==1.45.2 opentelemetry-proto==1.45.2
    opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2 prettytable==3.18.0
    pyasn1==0.6.5 pyasn1-modules==0.4.2 pycparser==3.12 pydantic==2.14.4 pydantic-core==2.50.5
    python-dotenv==1.2.4 skops==0.16.0 smmap==5.0.3 sqlalchemy==2.1.9 sqlparse==0.6.1
    starlette==1.10.0 termcolor==3.3.0 tomli-w==1.2.0 typing-inspection==0.4.5 uvicorn==0.54.0
    wcwidth==0.9.4 yacs==0.1.8
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64; do
    platforms+=(--platform "$p")
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dest" "${wheels[@]}"
# fvcore and iopath publish no wheel; both are pure Python, so wheels built here serve any Python 3
for sdist in fvcore==0.1.5.post20221221 iopath==0.1.10; do
    compgen -G "$dest/${sdist%%==*}-*.whl" >/dev/null \
        || "$py" -m pip wheel -q --no-deps -w "$dest" "$sdist"
done
"$py" benchmarks/check_wheelhouse.py "$dest" benchmarks/gpu_image_packages.txt --max-mib 60
