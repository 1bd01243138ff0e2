// A second MQTT broker for the tests: Aedes, an implementation independent of
// Mosquitto, kept in memory only. A restart forgets every session, subscription,
// queued and retained message, as a broker without persistence does.
//
//   node broker.js <port> [<tls port> <ca> <cert> <key>]
//
// Listens on 127.0.0.1; the TLS listener requires a client certificate signed by <ca>.
// AEDES_REFUSE_SUBSCRIPTION names a topic filter whose subscription is refused (return
// code 0x80), as a broker's access rules would.
'use strict'

const fs = require('node:fs')
const net = require('node:net')
const tls = require('node:tls')
const createBroker = require('aedes')

function main () {
  const [port, tlsPort, ca, cert, key] = process.argv.slice(2)
  if (!port) {
    console.error('usage: node broker.js <port> [<tls port> <ca> <cert> <key>]')
    process.exit(2)
  }
  const broker = createBroker()
  const refused = process.env.AEDES_REFUSE_SUBSCRIPTION
  if (refused) {
    broker.authorizeSubscribe = (client, sub, callback) =>
      callback(null, sub.topic === refused ? null : sub)
  }
  broker.on('clientError', (client, err) => console.error(`client ${client.id}: ${err.message}`))
  broker.on('connectionError', (client, err) => console.error(`connection: ${err.message}`))
  net.createServer({ noDelay: true }, broker.handle).listen(Number(port), '127.0.0.1')
  if (tlsPort) {
    const options = {
      ca: fs.readFileSync(ca),
      cert: fs.readFileSync(cert),
      key: fs.readFileSync(key),
      requestCert: true,
      rejectUnauthorized: true
    }
    tls.createServer(options, broker.handle).listen(Number(tlsPort), '127.0.0.1')
  }
  // The harness stops the broker with SIGTERM: go at once, saving nothing.
  process.on('SIGTERM', () => process.exit(0))
}

main()
