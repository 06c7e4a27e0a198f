# syntax=docker/dockerfile:1
# notifyd container image: `notifyd serve` as an unprivileged user on port 8000.
#
#   docker build -t notifyd .
#   docker run --rm --env-file notifyd.env notifyd migrate     # once per release
#   docker run -d --env-file notifyd.env -p 8000:8000 notifyd  # serve
#
# Two stages: the builder resolves and installs notifyd and its dependencies into /opt/venv,
# the runtime copies that venv and nothing else (no source tree, no pip cache, no compilers, no
# dev tools).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app

# Dependencies first, in their own layer, so a code change does not reinstall them. The lock
# also pins the dev tools (pytest, mypy...); used as constraints, it installs exactly the
# runtime dependencies pyproject.toml names, at the locked versions. A stub package stands in
# for the code here and is uninstalled again.
COPY pyproject.toml requirements.lock ./
RUN mkdir notifyd && touch notifyd/__init__.py README.md \
    && pip install --constraint requirements.lock . \
    && pip uninstall --yes notifyd \
    && rm -rf notifyd notifyd.egg-info README.md build

# The code, a regular (non-editable) install: the migrations ship inside the package
# (notifyd/sql/, read through importlib.resources), so site-packages holds everything notifyd
# runs and the source tree stays in the builder. pip writes the byte code as it installs.
COPY README.md ./
COPY notifyd ./notifyd
RUN pip install --no-deps --constraint requirements.lock .

FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NOTIFYD_HOST=0.0.0.0 \
    NOTIFYD_PORT=8000 \
    NOTIFYD_LOG_FORMAT=json
RUN groupadd --system --gid 10001 notifyd \
    && useradd --system --uid 10001 --gid notifyd --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin notifyd
# root owns the venv (code included); the service user can read it, not change it. The
# working folder is empty: notifyd would read a .env there
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
USER 10001:10001
EXPOSE 8000
# /healthz says the event loop answers; /readyz (PostgreSQL, Redis, actors) is for routing
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('NOTIFYD_PORT', '8000'), timeout=3)" || exit 1
# SIGTERM: stop accepting, finish in-flight requests, stop the actors, exit 0
STOPSIGNAL SIGTERM
ENTRYPOINT ["notifyd"]
CMD ["serve"]
