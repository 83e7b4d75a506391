# The image behind compose.yaml's detector and demo services: the library and `dlm`.
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY redlockdlm ./redlockdlm
COPY cli ./cli
COPY lua ./lua
RUN pip install --no-cache-dir . && rm -rf /src
ENTRYPOINT ["dlm"]
CMD ["--help"]
