// The checkout's shipping participant in Node.js, on the generic wire: it
// serves compensa.v1.ParticipantService (participant.proto) with
// @grpc/grpc-js, and reads and writes the Any payloads with protobufjs, as a
// participant in any language would. Its steps are those of the contract
// compensa.checkout.v1.ShippingParticipant (participants.proto).
//
// Usage: node shipping.js PROTOS_DIR  (NODE_PATH names the node_modules)
// Prints "listening PORT" once it serves on 127.0.0.1 (a free port).
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const protos = process.argv[2];
const TYPE_PREFIX = "type.googleapis.com/";
const SUCCEEDED = 1;

const definition = protoLoader.loadSync("compensa/v1/participant.proto", {
  keepCase: true, longs: String, enums: Number, defaults: true, includeDirs: [protos],
});
const service = grpc.loadPackageDefinition(definition).compensa.v1.ParticipantService.service;
const payloads = new protobuf.Root();
payloads.resolvePath = (_origin, target) => path.join(protos, target);
payloads.loadSync("compensa/checkout/v1/checkout.proto", { keepCase: true });
const CheckoutInput = payloads.lookupType("compensa.checkout.v1.CheckoutInput");
const Shipment = payloads.lookupType("compensa.checkout.v1.Shipment");

// Answers by idempotency key: a duplicate Execute gets the first answer.
const answered = new Map();

function unpack(any, type) {
  if (!any || any.type_url !== TYPE_PREFIX + type.fullName.replace(/^\./, "")) {
    throw new Error(`expected a ${type.fullName}, got ${any ? any.type_url : "nothing"}`);
  }
  return type.decode(any.value);
}

function pack(type, fields) {
  return { type_url: TYPE_PREFIX + type.fullName.replace(/^\./, ""), value: type.encode(type.create(fields)).finish() };
}

const steps = {
  ship_order(request) {
    const checkout = unpack(request.saga_input, CheckoutInput);
    return pack(Shipment, { tracking_number: `node-${checkout.order_id}` });
  },
};

function execute(call, callback) {
  const context = call.request.context;
  const known = answered.get(context.idempotency_key);
  if (known) return callback(null, known);
  const step = steps[context.step_name];
  if (!step) {
    return callback({ code: grpc.status.FAILED_PRECONDITION, details: `no step ${context.step_name}` });
  }
  try {
    const response = { result: SUCCEEDED, output: step(call.request) };
    answered.set(context.idempotency_key, response);
    callback(null, response);
  } catch (error) {
    callback({ code: grpc.status.ABORTED, details: String(error.message) });
  }
}

function compensate(call, callback) {
  callback({ code: grpc.status.FAILED_PRECONDITION, details: "ship_order is a pivot: it cannot be undone" });
}

const server = new grpc.Server();
server.addService(service, { Execute: execute, Compensate: compensate });
server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (error, port) => {
  if (error) {
    console.error(error.message);
    process.exit(1);
  }
  console.log(`listening ${port}`);
});
process.on("SIGTERM", () => server.tryShutdown(() => process.exit(0)));
