#!/usr/bin/env node
// Example Node.js client of token-broker: CreateToken with @grpc/grpc-js, the service
// definition loaded at run time from proto/tokenbroker/v1/token_broker.proto by
// @grpc/proto-loader (no generated code).
//
//   node create-token.js build-robot -n demo --server 127.0.0.1:50051 --plaintext
//   node create-token.js build-robot -n demo --server unix:/run/token-broker/broker.sock
//   node create-token.js build-robot -n demo --server broker.example:8443 --cacert ca.crt \
//       [--cert client.crt --key client.key] --audience vault --duration-seconds 1800
//
// The bearer credential (an API key or an OIDC JWT) comes from $TOKEN_BROKER_CREDENTIAL (or
// --credential-file) and is sent as `authorization: Bearer ...`. Prints the token (or, with
// --json, the CreateTokenResponse). On failure: the gRPC code and message, the ErrorInfo
// reason/domain/metadata and the retry delay on stderr, and exit status 1.
//
// The channel uses ../service-config.json: gRPC retries UNAVAILABLE by itself, honouring the
// broker's grpc-retry-pushback-ms.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const { parseArgs } = require("node:util");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const REPO = path.resolve(__dirname, "..", "..");
const PROTO = path.join(REPO, "proto", "tokenbroker", "v1", "token_broker.proto");
const SERVICE_CONFIG = path.join(__dirname, "..", "service-config.json");

// google.rpc.Status and the details the broker sends (grpc-status-details-bin).
const rpcTypes = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        protobuf: {
          nested: {
            Any: { fields: { type_url: { type: "string", id: 1 }, value: { type: "bytes", id: 2 } } },
            Duration: { fields: { seconds: { type: "int64", id: 1 }, nanos: { type: "int32", id: 2 } } },
          },
        },
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: "int32", id: 1 },
                message: { type: "string", id: 2 },
                details: { rule: "repeated", type: "google.protobuf.Any", id: 3 },
              },
            },
            ErrorInfo: {
              fields: {
                reason: { type: "string", id: 1 },
                domain: { type: "string", id: 2 },
                metadata: { keyType: "string", type: "string", id: 3 },
              },
            },
            RetryInfo: { fields: { retry_delay: { type: "google.protobuf.Duration", id: 1 } } },
          },
        },
      },
    },
  },
});

function usage(message) {
  if (message) process.stderr.write(`error: ${message}\n`);
  process.stderr.write(
    "usage: create-token.js SERVICE_ACCOUNT -n NAMESPACE [--server ADDR] [--plaintext]\n" +
      "         [--cacert F] [--cert F --key F] [--server-name NAME] [--credential-file F]\n" +
      "         [--audience A]... [--duration-seconds N] [--timeout-seconds N] [--json]\n",
  );
  process.exit(2);
}

function parse() {
  let parsed;
  try {
    parsed = parseArgs({
      allowPositionals: true,
      options: {
        namespace: { type: "string", short: "n" },
        server: { type: "string", default: process.env.TOKEN_BROKER_SERVER || "127.0.0.1:50051" },
        plaintext: { type: "boolean", default: false },
        cacert: { type: "string" },
        cert: { type: "string" },
        key: { type: "string" },
        "server-name": { type: "string" },
        "credential-file": { type: "string" },
        audience: { type: "string", multiple: true, default: [] },
        "duration-seconds": { type: "string" },
        "timeout-seconds": { type: "string", default: "10" },
        json: { type: "boolean", default: false },
      },
    });
  } catch (err) {
    usage(err.message);
  }
  const { values, positionals } = parsed;
  if (positionals.length !== 1) usage("exactly one SERVICE_ACCOUNT is required");
  if (!values.namespace) usage("-n NAMESPACE is required");
  if (Boolean(values.cert) !== Boolean(values.key)) usage("--cert and --key go together");
  return { serviceAccount: positionals[0], ...values };
}

function channelCredentials(opts) {
  // The broker's unix socket is plaintext (its file mode decides who connects).
  if (opts.server.startsWith("unix:") || opts.plaintext) return grpc.credentials.createInsecure();
  const read = (file) => (file ? fs.readFileSync(file) : null);
  return grpc.credentials.createSsl(read(opts.cacert), read(opts.key), read(opts.cert));
}

function bearer(opts) {
  let credential = process.env.TOKEN_BROKER_CREDENTIAL || "";
  if (opts["credential-file"]) credential = fs.readFileSync(opts["credential-file"], "utf8");
  return credential.trim();
}

function describeError(err) {
  const lines = [`error: failed to create token: ${grpc.status[err.code]}: ${err.details}`];
  const raw = err.metadata && err.metadata.get("grpc-status-details-bin")[0];
  if (raw) {
    const status = rpcTypes.lookupType("google.rpc.Status").decode(raw);
    for (const detail of status.details) {
      const name = detail.type_url.split("/").pop();
      if (name === "google.rpc.ErrorInfo") {
        const info = rpcTypes.lookupType(name).decode(detail.value);
        lines.push(`  reason: ${info.reason} (domain ${info.domain})`);
        for (const [k, v] of Object.entries(info.metadata || {}).sort()) lines.push(`  ${k}: ${v}`);
      } else if (name === "google.rpc.RetryInfo") {
        const delay = rpcTypes.lookupType(name).decode(detail.value).retry_delay || {};
        lines.push(`  retry after: ${Number(delay.seconds || 0) + (delay.nanos || 0) / 1e9}s`);
      }
    }
  }
  return lines.join("\n") + "\n";
}

function main() {
  const opts = parse();
  const definition = protoLoader.loadSync(PROTO, {
    keepCase: true, // field names as in the .proto: service_account, token_request, ...
    longs: String,
    enums: String,
    defaults: false,
    oneofs: false,
  });
  const { TokenBrokerService } = grpc.loadPackageDefinition(definition).tokenbroker.v1;
  const options = { "grpc.service_config": fs.readFileSync(SERVICE_CONFIG, "utf8") };
  if (opts["server-name"]) options["grpc.ssl_target_name_override"] = opts["server-name"];
  if (opts["server-name"]) options["grpc.default_authority"] = opts["server-name"];
  const client = new TokenBrokerService(opts.server, channelCredentials(opts), options);

  const spec = { audiences: opts.audience };
  if (opts["duration-seconds"]) spec.expiration_seconds = opts["duration-seconds"];
  const request = {
    namespace: opts.namespace,
    service_account: opts.serviceAccount,
    token_request: { spec },
  };
  const metadata = new grpc.Metadata();
  const credential = bearer(opts);
  if (credential) metadata.set("authorization", `Bearer ${credential}`);
  const deadline = new Date(Date.now() + Number(opts["timeout-seconds"]) * 1000);

  client.CreateToken(request, metadata, { deadline }, (err, response) => {
    client.close();
    if (err) {
      process.stderr.write(describeError(err));
      process.exitCode = 1;
      return;
    }
    for (const warning of response.warnings || []) process.stderr.write(`Warning: ${warning}\n`);
    if (opts.json) {
      process.stdout.write(JSON.stringify(response, null, 2) + "\n");
    } else {
      process.stdout.write(response.token_request.status.token + "\n");
    }
  });
}

main();
