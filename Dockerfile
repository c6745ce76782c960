# The platform's own image: `fastapi-deploy server` (the control plane) and `fastapi-deploy router` (the
# apps' gateway), as charts/fastapi-deploy runs them: non-root (10001), a read-only root filesystem, the
# data directory on /data, scratch space on /tmp.
#
#   docker build -t fastapi-deploy .
#   docker run -p 8000:8000 -p 8080:8080 -v fdp-data:/data fastapi-deploy            # server
#   docker run -e FASTAPI_DEPLOY_CONTROL_PLANE_URL=... -e FASTAPI_DEPLOY_ROUTER_TOKEN=... fastapi-deploy router
#
# BASE: any Debian-based image with python3 >= 3.11 and its venv module. PACKAGE and PIP_ARGS let an
# offline build install from a wheelhouse in the context (tests/test_platform_image.py does).
ARG BASE=python:3.12-slim

FROM ${BASE} AS build
ARG PACKAGE="/src[postgres,docker,kubernetes]"
ARG PIP_ARGS=""
COPY . /src
RUN python3 -m venv /opt/fastapi-deploy \
 && /opt/fastapi-deploy/bin/pip install --no-cache-dir --disable-pip-version-check ${PIP_ARGS} "${PACKAGE}" \
 && /opt/fastapi-deploy/bin/fastapi-deploy --help > /dev/null

FROM ${BASE}
RUN groupadd --system --gid 10001 fastapi-deploy \
 && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home fastapi-deploy \
 && mkdir -p /data && chown 10001:10001 /data
COPY --from=build /opt/fastapi-deploy /opt/fastapi-deploy
ENV PATH=/opt/fastapi-deploy/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FASTAPI_DEPLOY_DATA_DIR=/data \
    FASTAPI_DEPLOY_HOST=0.0.0.0 \
    FASTAPI_DEPLOY_ROUTER_HOST=0.0.0.0
USER 10001:10001
WORKDIR /data
VOLUME /data
# API and dashboard, the apps' router, a remote router's health port.
EXPOSE 8000 8080 8081
ENTRYPOINT ["fastapi-deploy"]
CMD ["server"]
