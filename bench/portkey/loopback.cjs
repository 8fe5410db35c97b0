// Preloaded by bench/compare.sh (`node --require ./loopback.cjs build/start-server.js --port=0`):
// the Portkey gateway's start script binds its port on every interface and prints
// "http://localhost:PORT" with the port it was asked for, not the one it got. The benchmark
// listens on loopback only and on port 0, so the first TCP server started here is bound to
// 127.0.0.1 and announces the port the kernel chose, in the line the harness waits for:
//   portkey: listening on http://127.0.0.1:PORT
// Nothing else of the gateway is changed.
'use strict';
const net = require('net');

const listen = net.Server.prototype.listen;
let done = false;
net.Server.prototype.listen = function (...args) {
  if (done) return listen.apply(this, args);
  done = true;
  // listen(port[, host][, backlog][, cb]) or listen({port, host, ...}[, cb])
  const cb = typeof args[args.length - 1] === 'function' ? args[args.length - 1] : undefined;
  let port = 0;
  if (typeof args[0] === 'object' && args[0] !== null) port = args[0].port || 0;
  else if (args[0] !== undefined) port = Number(args[0]) || 0;
  this.once('listening', () => {
    process.stdout.write(`portkey: listening on http://127.0.0.1:${this.address().port}\n`);
  });
  return cb ? listen.call(this, { port, host: '127.0.0.1' }, cb) : listen.call(this, { port, host: '127.0.0.1' });
};
