"""kube-apiserver's behaviour at the TokenRequest endpoint, as data and pure functions: the
Kubernetes protobuf envelope (`wire`), `Status` bodies and the Go formatting of their messages
(`status`), and decoding a TokenRequest body as the apiserver's serializers do (`body`).

Shared by the API-server emulator (broker.emulator), which must answer as the API server does,
and the broker's Kubernetes-compatible HTTP door (broker.http_kubernetes), which must too.
Nothing here runs a server or reads state.
"""
