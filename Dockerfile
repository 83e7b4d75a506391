# The image behind compose.yaml's init, detector and demo services: the library and `dlm`,
# run as the unprivileged user dlm (uid 10001).
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY redlockdlm ./redlockdlm
COPY cli ./cli
COPY lua ./lua
COPY scripts/compose-init.sh /usr/local/bin/dlm-compose-init
RUN pip install --no-cache-dir . && rm -rf /src \
    && chmod 0755 /usr/local/bin/dlm-compose-init \
    && useradd --create-home --uid 10001 dlm \
    && mkdir -p /var/lib/dlm-init && chown dlm /var/lib/dlm-init
# compose.yaml's init service mounts a named volume on /var/lib/dlm-init; Docker seeds a new
# one with this directory's owner, so the user dlm can write the marker there.
USER dlm
WORKDIR /home/dlm
ENTRYPOINT ["dlm"]
CMD ["--help"]
