// A non-Python client of the public gRPC API: calls specsplit.v1.Gateway/Generate with
// @grpc/grpc-js, loading protos/specsplit/v1/gateway.proto at run time with @grpc/proto-loader.
//
//   node generate.js HOST:PORT PROMPT MAX_TOKENS
//
// Prints the streamed text to stdout as it arrives and, at the end, one JSON line with the
// final message's usage and speculation statistics to stderr. Exit code 0 on success;
// 1 with the gRPC status on stderr otherwise.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [address, prompt, maxTokens] = process.argv.slice(2);
if (!address || prompt === undefined || !maxTokens) {
  process.stderr.write("usage: node generate.js HOST:PORT PROMPT MAX_TOKENS\n");
  process.exit(2);
}

const protoRoot = path.resolve(__dirname, "..", "..", "..", "protos");
const definition = protoLoader.loadSync("specsplit/v1/gateway.proto", {
  includeDirs: [protoRoot],
  keepCase: true, // field names as in the .proto (max_tokens, token_ids)
  longs: String,
  enums: String,
  defaults: false,
  oneofs: true,
});
const specsplit = grpc.loadPackageDefinition(definition).specsplit.v1;
const client = new specsplit.Gateway(address, grpc.credentials.createInsecure());

const request = {
  text: prompt,
  // proto3 `optional` fields: temperature 0 is sent explicitly (greedy), not left unset
  params: { max_tokens: Number(maxTokens), temperature: 0, ignore_eos: true },
};
const call = client.Generate(request, { deadline: Date.now() + 60_000 });
let final = null;
call.on("data", (msg) => {
  if (msg.text) process.stdout.write(msg.text); // unset (empty) on the final message
  if (msg.usage) final = { finish_reason: msg.finish_reason, usage: msg.usage, stats: msg.stats };
});
call.on("error", (err) => {
  process.stderr.write(`gRPC error ${grpc.status[err.code]}: ${err.details}\n`);
  process.exit(1);
});
call.on("end", () => {
  process.stderr.write(JSON.stringify(final) + "\n");
  client.close();
});
