// A Signal Protocol engine for tests/test_libsignal.py: the official libsignal
// (npm @signalapp/libsignal-client) holding the keys and sessions of several
// devices, driven over stdin/stdout with one JSON object per line.  The relay
// under test only carries what this script produces; it never sees a private key.
//
// Requests: {"op": ..., ...}; every answer is {"ok": true, ...} or
// {"ok": false, "error": "..."}.  Bytes travel base64-encoded.
//
//   device   {name, address, n_ec, n_kem}  new device: identity, registration id,
//            signed EC prekey, last-resort KEM prekey, one-time EC and KEM prekeys
//            -> {reg_id, identity, signed: [id, pub, sig], last_resort: [id, pub, sig],
//                ec: [[id, pub]], kem: [[id, pub, sig]]}
//   set_id   {name, device_id}             the device id the relay assigned
//   session  {name, peer, device_id, bundle: [device_id, reg_id, identity, signed,
//            one_time | null, kem, last_resort]}   PQXDH from a relay-served bundle
//   encrypt  {name, peer, device_id, plaintext}  -> {body}: 1 type byte + ciphertext
//   decrypt  {name, peer, device_id, body}       -> {plaintext}
//   skdm     {name, group}                 this device's SenderKeyDistributionMessage for
//            a group (distribution id: the 16-byte group id as a UUID) -> {body}
//   sk_process {name, peer, device_id, body}   a received SenderKeyDistributionMessage
//   sk_reset {name, group}                 forget this device's own sender key (rotation)
//   gencrypt {name, group, plaintext}      -> {body}: a SenderKeyMessage
//   gdecrypt {name, peer, device_id, body} -> {plaintext}
'use strict';

const S = require('@signalapp/libsignal-client');
const readline = require('readline');

const b64 = (u8) => Buffer.from(u8).toString('base64');
const bytes = (s) => new Uint8Array(Buffer.from(s, 'base64'));
const key = (a) => `${a.name()}.${a.deviceId()}`;

class Sessions extends S.SessionStore {
  constructor() { super(); this.m = new Map(); }
  async saveSession(a, r) { this.m.set(key(a), r.serialize()); }
  async getSession(a) {
    const r = this.m.get(key(a));
    return r ? S.SessionRecord.deserialize(r) : null;
  }
  async getExistingSessions(as) {
    return as.map((a) => {
      const r = this.m.get(key(a));
      if (!r) throw new Error(`no session for ${key(a)}`);
      return S.SessionRecord.deserialize(r);
    });
  }
}

class Identities extends S.IdentityKeyStore {
  constructor(pair, reg) { super(); this.pair = pair; this.reg = reg; this.m = new Map(); }
  async getIdentityKey() { return this.pair.privateKey; }
  async getLocalRegistrationId() { return this.reg; }
  async saveIdentity(a, k) {
    const old = this.m.get(key(a));
    this.m.set(key(a), k.serialize());
    return old && Buffer.compare(Buffer.from(old), Buffer.from(k.serialize())) !== 0
      ? S.IdentityChange.ReplacedExisting : S.IdentityChange.NewOrUnchanged;
  }
  async isTrustedIdentity() { return true; }  // trust on first use, as a test peer
  async getIdentity(a) {
    const k = this.m.get(key(a));
    return k ? S.PublicKey.deserialize(k) : null;
  }
}

class PreKeys extends S.PreKeyStore {
  constructor() { super(); this.m = new Map(); }
  async savePreKey(id, r) { this.m.set(id, r); }
  async getPreKey(id) {
    if (!this.m.has(id)) throw new Error(`no prekey ${id}`);
    return this.m.get(id);
  }
  async removePreKey(id) { this.m.delete(id); }
}

class SignedPreKeys extends S.SignedPreKeyStore {
  constructor() { super(); this.m = new Map(); }
  async saveSignedPreKey(id, r) { this.m.set(id, r); }
  async getSignedPreKey(id) { return this.m.get(id); }
}

class KyberPreKeys extends S.KyberPreKeyStore {
  constructor(lastResort) { super(); this.m = new Map(); this.lastResort = lastResort; }
  async saveKyberPreKey(id, r) { this.m.set(id, r); }
  async getKyberPreKey(id) {
    if (!this.m.has(id)) throw new Error(`no kyber prekey ${id}`);
    return this.m.get(id);
  }
  async markKyberPreKeyUsed(id) { if (id !== this.lastResort) this.m.delete(id); }
}

class SenderKeys extends S.SenderKeyStore {
  constructor() { super(); this.m = new Map(); }
  async saveSenderKey(a, id, r) { this.m.set(`${key(a)}/${id}`, r.serialize()); }
  async getSenderKey(a, id) {
    const r = this.m.get(`${key(a)}/${id}`);
    return r ? S.SenderKeyRecord.deserialize(r) : null;
  }
}

// the 16-byte group id (base64) as the UUID libsignal names a distribution by
const dist = (g) => {
  const h = Buffer.from(g, 'base64').toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
};

const devices = new Map();

function newDevice({ name, address, n_ec, n_kem }) {
  const pair = S.IdentityKeyPair.generate();
  const reg = 1 + Math.floor(Math.random() * 16380);
  const d = {
    address, deviceId: 0, pair, reg,
    sessions: new Sessions(), identities: new Identities(pair, reg), prekeys: new PreKeys(),
    signed: new SignedPreKeys(), kyber: new KyberPreKeys(1000), senderKeys: new SenderKeys(),
  };
  const now = Date.now();
  const spk = S.PrivateKey.generate();
  const spkSig = pair.privateKey.sign(spk.getPublicKey().serialize());
  d.signed.m.set(1, S.SignedPreKeyRecord.new(1, now, spk.getPublicKey(), spk, spkSig));
  const kemRecord = (id) => {
    const kp = S.KEMKeyPair.generate();
    const sig = pair.privateKey.sign(kp.getPublicKey().serialize());
    d.kyber.m.set(id, S.KyberPreKeyRecord.new(id, now, kp, sig));
    return [id, b64(kp.getPublicKey().serialize()), b64(sig)];
  };
  const lastResort = kemRecord(1000);
  const ec = [];
  for (let i = 1; i <= n_ec; i++) {
    const k = S.PrivateKey.generate();
    d.prekeys.m.set(i, S.PreKeyRecord.new(i, k.getPublicKey(), k));
    ec.push([i, b64(k.getPublicKey().serialize())]);
  }
  const kem = [];
  for (let i = 1; i <= n_kem; i++) kem.push(kemRecord(100 + i));
  devices.set(name, d);
  return {
    reg_id: reg, identity: b64(pair.publicKey.serialize()),
    signed: [1, b64(spk.getPublicKey().serialize()), b64(spkSig)], last_resort: lastResort,
    ec, kem,
  };
}

function dev(name) {
  const d = devices.get(name);
  if (!d) throw new Error(`unknown device ${name}`);
  return d;
}

const me = (d) => S.ProtocolAddress.new(d.address, d.deviceId);

async function handle(req) {
  switch (req.op) {
    case 'device':
      return newDevice(req);
    case 'set_id':
      dev(req.name).deviceId = req.device_id;
      return {};
    case 'session': {
      const d = dev(req.name);
      const [did, reg, ik, signed, otk, kem] = req.bundle;
      const bundle = S.PreKeyBundle.new(
        reg, did, otk ? otk[0] : null, otk ? S.PublicKey.deserialize(bytes(otk[1])) : null,
        signed[0], S.PublicKey.deserialize(bytes(signed[1])), bytes(signed[2]),
        S.PublicKey.deserialize(bytes(ik)),
        kem[0], S.KEMPublicKey.deserialize(bytes(kem[1])), bytes(kem[2]));
      await S.processPreKeyBundle(bundle, S.ProtocolAddress.new(req.peer, req.device_id), me(d),
        d.sessions, d.identities);
      return {};
    }
    case 'encrypt': {
      const d = dev(req.name);
      const ct = await S.signalEncrypt(bytes(req.plaintext),
        S.ProtocolAddress.new(req.peer, req.device_id), me(d), d.sessions, d.identities);
      return { body: b64(Buffer.concat([Buffer.from([ct.type()]), Buffer.from(ct.serialize())])) };
    }
    case 'decrypt': {
      const d = dev(req.name);
      const body = bytes(req.body);
      const from = S.ProtocolAddress.new(req.peer, req.device_id);
      const msg = body.slice(1);
      let pt;
      if (body[0] === S.CiphertextMessageType.PreKey) {
        pt = await S.signalDecryptPreKey(S.PreKeySignalMessage.deserialize(msg), from, me(d),
          d.sessions, d.identities, d.prekeys, d.signed, d.kyber);
      } else {
        pt = await S.signalDecrypt(S.SignalMessage.deserialize(msg), from, me(d), d.sessions,
          d.identities);
      }
      return { plaintext: b64(pt) };
    }
    case 'skdm': {
      const d = dev(req.name);
      const m = await S.SenderKeyDistributionMessage.create(me(d), dist(req.group), d.senderKeys);
      return { body: b64(m.serialize()) };
    }
    case 'sk_process': {
      const d = dev(req.name);
      await S.processSenderKeyDistributionMessage(S.ProtocolAddress.new(req.peer, req.device_id),
        S.SenderKeyDistributionMessage.deserialize(bytes(req.body)), d.senderKeys);
      return {};
    }
    case 'sk_reset': {
      const d = dev(req.name);
      d.senderKeys.m.delete(`${key(me(d))}/${dist(req.group)}`);
      return {};
    }
    case 'gencrypt': {
      const d = dev(req.name);
      const ct = await S.groupEncrypt(me(d), dist(req.group), d.senderKeys, bytes(req.plaintext));
      return { body: b64(ct.serialize()) };
    }
    case 'gdecrypt': {
      const d = dev(req.name);
      const pt = await S.groupDecrypt(S.ProtocolAddress.new(req.peer, req.device_id),
        d.senderKeys, bytes(req.body));
      return { plaintext: b64(pt) };
    }
    default:
      throw new Error(`unknown op ${req.op}`);
  }
}

const rl = readline.createInterface({ input: process.stdin });
let chain = Promise.resolve();
rl.on('line', (line) => {
  // one request at a time, answered in order
  chain = chain.then(async () => {
    let out;
    try {
      out = { ok: true, ...(await handle(JSON.parse(line))) };
    } catch (e) {
      out = { ok: false, error: String(e && e.stack ? e.stack : e) };
    }
    process.stdout.write(JSON.stringify(out) + '\n');
  });
});
rl.on('close', () => { chain.then(() => process.exit(0)); });
