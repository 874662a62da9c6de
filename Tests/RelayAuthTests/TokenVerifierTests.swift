// Tests of TokenVerifier and TokenMinter. Tokens are made here by hand (base64url JSON,
// swift-crypto signatures) so that the relay is checked against the JWT format itself,
// not against the library it uses.
//
// Contract 5, auth failure: "no token, malformed, bad signature, a header `alg` other than the
// key's own algorithm (check it yourself: token libraries may ignore the header), expired, not yet
// valid ... No clock leeway." Contract 3: `--jwt-secret-file` (HS256/HS384/HS512),
// `--jwt-public-key-file` (RS256/ES256/EdDSA).

import Crypto
import CryptoExtras
import Foundation
import RelayHub
import Testing

@testable import RelayAuth

// MARK: - Helpers

private let now = Date(timeIntervalSince1970: 1_700_000_000)
private let nowSeconds = 1_700_000_000

private func base64URL(_ data: some DataProtocol) -> String {
    Data(data).base64EncodedString()
        .replacingOccurrences(of: "+", with: "-")
        .replacingOccurrences(of: "/", with: "_")
        .replacingOccurrences(of: "=", with: "")
}

private func base64URLDecode(_ text: Substring) -> Data? {
    var base64 = text.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
    while base64.count % 4 != 0 { base64.append("=") }
    return Data(base64Encoded: base64)
}

private func json(_ object: [String: Any]) -> Data {
    try! JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])
}

/// `header.payload` of a JWT.
private func signingInput(header: [String: Any], claims: [String: Any]) -> String {
    base64URL(json(header)) + "." + base64URL(json(claims))
}

private func hmac(_ alg: String, key: [UInt8], _ input: String) -> [UInt8] {
    let key = SymmetricKey(data: key)
    let data = Data(input.utf8)
    switch alg {
    case "HS384": return Array(HMAC<SHA384>.authenticationCode(for: data, using: key))
    case "HS512": return Array(HMAC<SHA512>.authenticationCode(for: data, using: key))
    default: return Array(HMAC<SHA256>.authenticationCode(for: data, using: key))
    }
}

/// An HMAC token whose header says `alg` and whose MAC is made with `macAlg` (the same unless given).
private func hmacToken(
    alg: String, macAlg: String? = nil, key: [UInt8], claims: [String: Any], extraHeader: [String: Any] = [:]
) -> String {
    var header: [String: Any] = ["alg": alg, "typ": "JWT"]
    header.merge(extraHeader) { _, new in new }
    let input = signingInput(header: header, claims: claims)
    return input + "." + base64URL(hmac(macAlg ?? alg, key: key, input))
}

private func claims(
    sub: String? = "alice", topics: [String]? = ["task:1", "job:*"], exp: Double? = Double(nowSeconds + 600),
    nbf: Double? = nil
) -> [String: Any] {
    var out: [String: Any] = [:]
    if let sub { out["sub"] = sub }
    if let topics { out["topics"] = topics }
    if let exp { out["exp"] = exp == exp.rounded() ? Int(exp) as Any : exp as Any }
    if let nbf { out["nbf"] = nbf == nbf.rounded() ? Int(nbf) as Any : nbf as Any }
    return out
}

/// 64 bytes: long enough for HS512 (RFC 7518 §3.2).
private let secret = Array("relay-test-secret-0123456789abcdef-relay-test-secret-0123456789ab".utf8)

private func secretVerifier(_ secret: [UInt8] = secret, templates: [String] = []) async throws -> TokenVerifier {
    try await TokenVerifier(key: .secret(secret), grantTemplates: templates.compactMap(GrantTemplate.init))
}

private func failure(_ result: Result<Principal, TokenError>) -> TokenError? {
    if case .failure(let error) = result { return error }
    return nil
}

private func principal(_ result: Result<Principal, TokenError>) -> Principal? {
    if case .success(let principal) = result { return principal }
    return nil
}

/// The SubjectPublicKeyInfo PEM of an Ed25519 public key (RFC 8410).
private func ed25519PEM(_ key: Curve25519.Signing.PublicKey) -> String {
    let prefix: [UInt8] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00]
    let der = Data(prefix + Array(key.rawRepresentation))
    let base64 = der.base64EncodedString()
    return "-----BEGIN PUBLIC KEY-----\n" + base64 + "\n-----END PUBLIC KEY-----\n"
}

private func es256Token(_ key: P256.Signing.PrivateKey, alg: String = "ES256", claims: [String: Any]) throws -> String {
    let input = signingInput(header: ["alg": alg, "typ": "JWT"], claims: claims)
    let signature = try key.signature(for: Data(input.utf8))
    #expect(signature.rawRepresentation.count == 64)
    return input + "." + base64URL(signature.rawRepresentation)
}

private func eddsaToken(
    _ key: Curve25519.Signing.PrivateKey, alg: String = "EdDSA", claims: [String: Any]
) throws -> String {
    let input = signingInput(header: ["alg": alg, "typ": "JWT"], claims: claims)
    let signature = try key.signature(for: Data(input.utf8))
    return input + "." + base64URL(signature)
}

// MARK: - HMAC secrets

@Suite("TokenVerifier: HMAC secret")
struct TokenVerifierSecretTests {
    @Test("a valid token gives subject, grants (claim plus templates) and exp", arguments: ["HS256", "HS384", "HS512"])
    func valid(alg: String) async throws {
        let verifier = try await secretVerifier(templates: ["user:{sub}:*", "public"])
        #expect(verifier.algorithms == ["HS256", "HS384", "HS512"])
        let token = hmacToken(alg: alg, key: secret, claims: claims())
        let result = await verifier.verify(token, now: now)
        let p = try #require(principal(result), "\(result)")
        #expect(p.subject == "alice")
        #expect(p.expiresAt == Int64(nowSeconds + 600))
        #expect(p.grants == GrantSet(["task:1", "job:*", "user:alice:*", "public"]))
        #expect(p.grants.covers("task:1"))
        #expect(p.grants.covers("job:7"))
        #expect(p.grants.covers("user:alice:x"))
        #expect(!p.grants.covers("user:bob:x"))
        #expect(!p.grants.covers("task:2"))
        #expect(p == Principal(subject: "alice", grants: GrantSet(["task:1", "job:*", "user:alice:*", "public"]), expiresAt: Int64(nowSeconds + 600)))
    }

    @Test("grants: no topics claim means templates only; malformed claim entries grant nothing")
    func grants() async throws {
        let verifier = try await secretVerifier(templates: ["user:{sub}:*"])
        let onlyTemplates = principal(
            await verifier.verify(hmacToken(alg: "HS256", key: secret, claims: claims(topics: nil)), now: now))
        #expect(onlyTemplates?.grants == GrantSet(["user:alice:*"]))

        let malformed = principal(
            await verifier.verify(
                hmacToken(alg: "HS256", key: secret, claims: claims(topics: ["ta*sk", "ok", "bad topic", "**"])),
                now: now))
        #expect(malformed?.grants == GrantSet(["ok", "user:alice:*"]))
        #expect(malformed?.grants.covers("ta") == false)
        #expect(malformed?.grants.covers("task") == false)

        let none = try await secretVerifier()
        let empty = principal(
            await none.verify(hmacToken(alg: "HS256", key: secret, claims: claims(topics: [])), now: now))
        #expect(empty?.grants.isEmpty == true)
    }

    @Test("a sub holding * cannot widen a {sub} template")
    func subCannotWiden() async throws {
        let verifier = try await secretVerifier(templates: ["{sub}", "user:{sub}:*"])
        for sub in ["*", "evil*", "a b"] {
            let p = principal(
                await verifier.verify(hmacToken(alg: "HS256", key: secret, claims: claims(sub: sub, topics: nil)), now: now))
            #expect(p?.subject == sub)
            #expect(p?.grants.isEmpty == true, "sub \(sub)")
            #expect(p?.grants.covers("anything") == false)
        }
    }

    @Test("a token without exp is refused by default: it would never expire")
    func noExpRefused() async throws {
        let verifier = try await secretVerifier()
        let result = await verifier.verify(hmacToken(alg: "HS256", key: secret, claims: claims(exp: nil)), now: now)
        #expect(failure(result) == .noExpiry)
    }

    @Test("a token without exp is valid, with no expiry, when the relay allows it")
    func noExpAllowed() async throws {
        let verifier = try await TokenVerifier(key: .secret(secret), grantTemplates: [], allowsMissingExpiry: true)
        let p = principal(await verifier.verify(hmacToken(alg: "HS256", key: secret, claims: claims(exp: nil)), now: now))
        #expect(p?.subject == "alice")
        #expect(p?.expiresAt == nil)
    }

    @Test("a kid must name a configured key; jwt-kit's fallback to its default key is never reached")
    func kidMustBeConfigured() async throws {
        let verifier = try await secretVerifier()
        #expect(verifier.keyIDs == ["key"])
        let named = hmacToken(alg: "HS256", key: secret, claims: claims(), extraHeader: ["kid": "key"])
        #expect(principal(await verifier.verify(named, now: now))?.subject == "alice")
        // Correctly signed with the one key, but naming another: refused before any signature check.
        let unknown = hmacToken(alg: "HS256", key: secret, claims: claims(), extraHeader: ["kid": "key-2024"])
        #expect(failure(await verifier.verify(unknown, now: now)) == .unknownKey)
        #expect(failure(await verifier.verify(unknown, now: now))?.reason == "kid")
        let notString = hmacToken(alg: "HS256", key: secret, claims: claims(), extraHeader: ["kid": 5])
        #expect(failure(await verifier.verify(notString, now: now)) == .malformed)
        let forged = hmacToken(alg: "HS256", key: Array("other".utf8), claims: claims(), extraHeader: ["kid": "key"])
        #expect(failure(await verifier.verify(forged, now: now)) == .badSignature)
    }

    @Test("no token: missing")
    func missing() async throws {
        let verifier = try await secretVerifier()
        #expect(failure(await verifier.verify(nil, now: now)) == .missing)
        #expect(failure(await verifier.verify("", now: now)) == .missing)
    }

    @Test("garbage: malformed")
    func malformed() async throws {
        let verifier = try await secretVerifier()
        let goodPayload = base64URL(json(claims()))
        var garbage = [
            "garbage", "a.b", "a.b.c", "a.b.c.d", "..", "...", "!!!.!!!.!!!", "Bearer x.y.z",
            base64URL(Data("not json".utf8)) + "." + goodPayload + ".sig",
            base64URL(json(["typ": "JWT"])) + "." + goodPayload + ".sig",
            base64URL(json(["alg": 256])) + "." + goodPayload + ".sig",
            base64URL(Data("[\"HS256\"]".utf8)) + "." + goodPayload + ".sig",
        ]
        // Correctly signed, but the payload is not a JSON object / sub is not a string / topics not strings.
        let header = base64URL(json(["alg": "HS256", "typ": "JWT"]))
        for payload in [Data("not json".utf8), Data("[1,2]".utf8), json(["sub": 5]), json(["sub": "a", "topics": [1]]),
            json(["sub": "a", "exp": "tomorrow"])]
        {
            let input = header + "." + base64URL(payload)
            garbage.append(input + "." + base64URL(hmac("HS256", key: secret, input)))
        }
        for token in garbage {
            #expect(failure(await verifier.verify(token, now: now)) == .malformed, "\(token)")
        }
    }

    @Test("bad signature", arguments: ["HS256", "HS384", "HS512"])
    func badSignature(alg: String) async throws {
        let verifier = try await secretVerifier()
        let otherKey = hmacToken(alg: alg, key: Array("another-secret-another-secret-1234".utf8), claims: claims())
        #expect(failure(await verifier.verify(otherKey, now: now)) == .badSignature)

        // Payload swapped after signing.
        let good = hmacToken(alg: alg, key: secret, claims: claims())
        let parts = good.split(separator: ".")
        let tampered = String(parts[0]) + "." + base64URL(json(claims(sub: "mallory", topics: ["*"]))) + "." + String(parts[2])
        #expect(failure(await verifier.verify(tampered, now: now)) == .badSignature)

        // A MAC of another size: HS256's MAC under an HS512 header, and so on.
        let wrongDigest = hmacToken(alg: alg, macAlg: alg == "HS256" ? "HS512" : "HS256", key: secret, claims: claims())
        #expect(failure(await verifier.verify(wrongDigest, now: now)) == .badSignature)
    }

    @Test(
        "a header alg other than the key's: algorithmNotAllowed",
        arguments: ["none", "None", "NONE", "RS256", "ES256", "EdDSA", "PS256", "hs256", "HS1", ""])
    func algorithmNotAllowed(alg: String) async throws {
        let verifier = try await secretVerifier()
        let input = signingInput(header: ["alg": alg, "typ": "JWT"], claims: claims(sub: "mallory", topics: ["*"]))
        // Unsigned, as `none` tokens are, and HMAC-signed with the real secret: both refused.
        #expect(failure(await verifier.verify(input + ".", now: now)) == .algorithmNotAllowed(alg))
        let macked = input + "." + base64URL(hmac("HS256", key: secret, input))
        #expect(failure(await verifier.verify(macked, now: now)) == .algorithmNotAllowed(alg))
    }

    @Test("exp: expired at exp exactly, no leeway")
    func expired() async throws {
        let verifier = try await secretVerifier()
        let atNow = hmacToken(alg: "HS256", key: secret, claims: claims(exp: Double(nowSeconds)))
        #expect(failure(await verifier.verify(atNow, now: now)) == .expired)
        let past = hmacToken(alg: "HS256", key: secret, claims: claims(exp: Double(nowSeconds - 1)))
        #expect(failure(await verifier.verify(past, now: now)) == .expired)
        let future = hmacToken(alg: "HS256", key: secret, claims: claims(exp: Double(nowSeconds + 1)))
        #expect(principal(await verifier.verify(future, now: now)) != nil)
        // Within the last second before exp: still valid; at exp: not.
        #expect(principal(await verifier.verify(future, now: now.addingTimeInterval(0.999))) != nil)
        #expect(failure(await verifier.verify(future, now: now.addingTimeInterval(1))) == .expired)
        #expect(failure(await verifier.verify(future, now: now.addingTimeInterval(1.001))) == .expired)
        // A long-expired token with a good signature.
        let old = hmacToken(alg: "HS512", key: secret, claims: claims(exp: 1_000_000_000))
        #expect(failure(await verifier.verify(old, now: now)) == .expired)
    }

    @Test("nbf: not yet valid before nbf, valid from nbf on")
    func notYetValid() async throws {
        let verifier = try await secretVerifier()
        let later = hmacToken(alg: "HS256", key: secret, claims: claims(nbf: Double(nowSeconds + 1)))
        #expect(failure(await verifier.verify(later, now: now)) == .notYetValid)
        #expect(failure(await verifier.verify(later, now: now.addingTimeInterval(0.5))) == .notYetValid)
        #expect(principal(await verifier.verify(later, now: now.addingTimeInterval(1))) != nil)
        let atNow = hmacToken(alg: "HS256", key: secret, claims: claims(nbf: Double(nowSeconds)))
        #expect(principal(await verifier.verify(atNow, now: now)) != nil)
        let past = hmacToken(alg: "HS256", key: secret, claims: claims(nbf: Double(nowSeconds - 100)))
        #expect(principal(await verifier.verify(past, now: now)) != nil)
    }

    @Test("no sub: noSubject")
    func noSubject() async throws {
        let verifier = try await secretVerifier(templates: ["user:{sub}:*"])
        let none = hmacToken(alg: "HS256", key: secret, claims: claims(sub: nil))
        #expect(failure(await verifier.verify(none, now: now)) == .noSubject)
        let empty = hmacToken(alg: "HS256", key: secret, claims: claims(sub: ""))
        #expect(failure(await verifier.verify(empty, now: now)) == .noSubject)
    }

    @Test("an empty secret is refused")
    func emptySecret() async {
        await #expect(throws: KeyError.self) { try await TokenVerifier(key: .secret([]), grantTemplates: []) }
    }

    // RFC 7518 §3.2: an HMAC key at least as long as the hash output. No zero-padding of short keys.
    @Test("a secret under 32 bytes is refused", arguments: [1, 6, 16, 31])
    func shortSecretRefused(length: Int) async {
        let key = (0..<length).map { UInt8(truncatingIfNeeded: 0x41 + $0 * 7) }
        await #expect(throws: KeyError.shortSecret(length)) { try await secretVerifier(key) }
        await #expect(throws: KeyError.shortSecret(length)) { try await TokenVerifier.check(.secret(key)) }
        #expect("\(KeyError.shortSecret(length))".contains("head -c 32 /dev/urandom | base64"))
    }

    @Test(
        "each HS algorithm only with a secret at least as long as its digest",
        arguments: [(32, ["HS256"]), (47, ["HS256"]), (48, ["HS256", "HS384"]), (63, ["HS256", "HS384"]),
            (64, ["HS256", "HS384", "HS512"]), (200, ["HS256", "HS384", "HS512"])])
    func secretLengths(length: Int, allowed: [String]) async throws {
        let key = (0..<length).map { UInt8(truncatingIfNeeded: 0x41 + $0 * 7) }
        let verifier = try await secretVerifier(key)
        #expect(verifier.algorithms == allowed)
        for alg in ["HS256", "HS384", "HS512"] {
            let token = hmacToken(alg: alg, key: key, claims: claims())
            let result = await verifier.verify(token, now: now)
            if allowed.contains(alg) {
                #expect(principal(result)?.subject == "alice", "\(alg), \(length)-byte secret: \(result)")
            } else {
                #expect(failure(result) == .algorithmNotAllowed(alg), "\(alg), \(length)-byte secret")
            }
        }
        let longer = hmacToken(alg: "HS256", key: key + [0x41], claims: claims())
        #expect(failure(await verifier.verify(longer, now: now)) == .badSignature)
    }
}

// MARK: - TokenMinter

@Suite("TokenMinter")
struct TokenMinterTests {
    @Test("hs256 output verifies and carries exp = now + ttl, iat and aud")
    func mintAndVerify() async throws {
        let key = Array("s3cret-s3cret-s3cret-s3cret-s3cr".utf8)
        let issued = Date(timeIntervalSince1970: 1_700_000_000.7)
        let token = try await TokenMinter.hs256(
            secret: key, subject: "alice", topics: ["task:*", "job:1"], ttl: 3600, now: issued)

        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        try #require(parts.count == 3)
        let headerData = try #require(base64URLDecode(parts[0]))
        let header = try JSONSerialization.jsonObject(with: headerData) as? [String: Any] ?? [:]
        #expect(header["alg"] as? String == "HS256")
        let payloadData = try #require(base64URLDecode(parts[1]))
        let payload = try JSONSerialization.jsonObject(with: payloadData) as? [String: Any] ?? [:]
        #expect(payload["sub"] as? String == "alice")
        #expect((payload["exp"] as? NSNumber)?.doubleValue == 1_700_003_600)
        #expect(payload["topics"] as? [String] == ["task:*", "job:1"])
        #expect((payload["iat"] as? NSNumber)?.doubleValue == 1_700_000_000)
        #expect(payload["aud"] as? String == "progress-relay")
        #expect(header["kid"] == nil)

        // Signed with plain HMAC-SHA256 of the short secret, as any other JWT library would check it.
        let expected = hmac("HS256", key: key, String(parts[0]) + "." + String(parts[1]))
        #expect(base64URLDecode(parts[2]).map { [UInt8]($0) } == expected)

        let verifier = try await secretVerifier(key)
        let p = try #require(principal(await verifier.verify(token, now: issued)))
        #expect(p.subject == "alice")
        #expect(p.expiresAt == 1_700_003_600)
        #expect(p.grants == GrantSet(["task:*", "job:1"]))
        #expect(principal(await verifier.verify(token, now: Date(timeIntervalSince1970: 1_700_003_599.9))) != nil)
        #expect(failure(await verifier.verify(token, now: Date(timeIntervalSince1970: 1_700_003_600))) == .expired)
    }

    @Test("hs256 refuses a short secret; writes kid when given and no aud when told")
    func mintOptions() async throws {
        await #expect(throws: KeyError.shortSecret(6)) {
            try await TokenMinter.hs256(secret: Array("s3cret".utf8), subject: "a", topics: [], ttl: 60)
        }
        let token = try await TokenMinter.hs256(
            secret: secret, subject: "a", topics: [], ttl: 60, now: now, audience: nil, kid: "k-2026")
        let parts = token.split(separator: ".")
        let header = try JSONSerialization.jsonObject(with: try #require(base64URLDecode(parts[0]))) as? [String: Any]
        #expect(header?["kid"] as? String == "k-2026")
        let payload = try JSONSerialization.jsonObject(with: try #require(base64URLDecode(parts[1]))) as? [String: Any]
        #expect(payload?["aud"] == nil)
    }

    @Test("hs256 with a long secret and the current time")
    func mintNow() async throws {
        let key = [UInt8](repeating: 0x5A, count: 100)
        let before = Date().timeIntervalSince1970
        let token = try await TokenMinter.hs256(secret: key, subject: "svc", topics: [], ttl: 60)
        let verifier = try await secretVerifier(key)
        let p = try #require(principal(await verifier.verify(token)))
        #expect(p.subject == "svc")
        let exp = Double(try #require(p.expiresAt))
        #expect(exp >= before.rounded(.down) + 60 && exp <= before + 61)
    }
}

// MARK: - Public keys

@Suite("TokenVerifier: public keys")
struct TokenVerifierPublicKeyTests {
    @Test("ES256: a token signed with the private key verifies")
    func es256() async throws {
        let key = P256.Signing.PrivateKey()
        let verifier = try await TokenVerifier(
            key: .publicKeyPEM(key.publicKey.pemRepresentation), grantTemplates: [GrantTemplate("user:{sub}:*")!])
        #expect(verifier.algorithms == ["ES256"])
        let result = await verifier.verify(try es256Token(key, claims: claims()), now: now)
        let p = try #require(principal(result), "\(result)")
        #expect(p.subject == "alice")
        #expect(p.grants == GrantSet(["task:1", "job:*", "user:alice:*"]))
        #expect(p.expiresAt == Int64(nowSeconds + 600))

        let expired = try es256Token(key, claims: claims(exp: Double(nowSeconds)))
        #expect(failure(await verifier.verify(expired, now: now)) == .expired)
        let other = try es256Token(P256.Signing.PrivateKey(), claims: claims())
        #expect(failure(await verifier.verify(other, now: now)) == .badSignature)
    }

    @Test("EdDSA (Ed25519): a token signed with the private key verifies")
    func eddsa() async throws {
        let key = Curve25519.Signing.PrivateKey()
        let pem = ed25519PEM(key.publicKey)
        let verifier = try await TokenVerifier(key: .publicKeyPEM(pem), grantTemplates: [])
        #expect(verifier.algorithms == ["EdDSA"])
        let result = await verifier.verify(try eddsaToken(key, claims: claims()), now: now)
        let p = try #require(principal(result), "\(result)")
        #expect(p.subject == "alice")
        #expect(p.grants == GrantSet(["task:1", "job:*"]))

        let other = try eddsaToken(Curve25519.Signing.PrivateKey(), claims: claims())
        #expect(failure(await verifier.verify(other, now: now)) == .badSignature)
        let notYet = try eddsaToken(key, claims: claims(nbf: Double(nowSeconds + 5)))
        #expect(failure(await verifier.verify(notYet, now: now)) == .notYetValid)
    }

    @Test("algorithm confusion: an HS256 token keyed with the public key PEM is refused")
    func algorithmConfusion() async throws {
        let p256 = P256.Signing.PrivateKey()
        let ed = Curve25519.Signing.PrivateKey()
        for pem in [p256.publicKey.pemRepresentation, ed25519PEM(ed.publicKey)] {
            let verifier = try await TokenVerifier(key: .publicKeyPEM(pem), grantTemplates: [])
            for keyText in [pem, pem.trimmingCharacters(in: .whitespacesAndNewlines)] {
                for alg in ["HS256", "HS384", "HS512"] {
                    let token = hmacToken(alg: alg, key: Array(keyText.utf8), claims: claims(sub: "mallory", topics: ["*"]))
                    #expect(failure(await verifier.verify(token, now: now)) == .algorithmNotAllowed(alg))
                }
            }
            let unsigned = signingInput(header: ["alg": "none"], claims: claims()) + "."
            #expect(failure(await verifier.verify(unsigned, now: now)) == .algorithmNotAllowed("none"))
        }
    }

    @Test("a valid signature under another algorithm's header is refused")
    func headerMustNameTheKeysAlgorithm() async throws {
        let p256 = P256.Signing.PrivateKey()
        let ed = Curve25519.Signing.PrivateKey()
        let es = try await TokenVerifier(key: .publicKeyPEM(p256.publicKey.pemRepresentation), grantTemplates: [])
        let eddsa = try await TokenVerifier(key: .publicKeyPEM(ed25519PEM(ed.publicKey)), grantTemplates: [])
        for alg in ["ES384", "ES512", "RS256", "EdDSA", "none"] {
            #expect(failure(await es.verify(try es256Token(p256, alg: alg, claims: claims()), now: now)) == .algorithmNotAllowed(alg))
        }
        for alg in ["Ed25519", "ES256", "RS256", "none"] {
            #expect(failure(await eddsa.verify(try eddsaToken(ed, alg: alg, claims: claims()), now: now)) == .algorithmNotAllowed(alg))
        }
        // Each verifier refuses the other's tokens by their header.
        #expect(failure(await eddsa.verify(try es256Token(p256, claims: claims()), now: now)) == .algorithmNotAllowed("ES256"))
        #expect(failure(await es.verify(try eddsaToken(ed, claims: claims()), now: now)) == .algorithmNotAllowed("EdDSA"))
    }

    @Test("RS256: a token signed with the private key verifies; HS256 keyed with the PEM is refused")
    func rs256() async throws {
        let key = try _RSA.Signing.PrivateKey(keySize: .bits2048)
        let pem = key.publicKey.pemRepresentation
        let verifier = try await TokenVerifier(key: .publicKeyPEM(pem), grantTemplates: [])
        #expect(verifier.algorithms == ["RS256"])

        func rs256Token(_ key: _RSA.Signing.PrivateKey, alg: String = "RS256", claims: [String: Any]) throws -> String {
            let input = signingInput(header: ["alg": alg, "typ": "JWT"], claims: claims)
            let signature = try key.signature(for: SHA256.hash(data: Data(input.utf8)), padding: .insecurePKCS1v1_5)
            return input + "." + base64URL(signature.rawRepresentation)
        }
        let result = await verifier.verify(try rs256Token(key, claims: claims()), now: now)
        let p = try #require(principal(result), "\(result)")
        #expect(p.subject == "alice")
        #expect(p.expiresAt == Int64(nowSeconds + 600))

        let expired = try rs256Token(key, claims: claims(exp: Double(nowSeconds)))
        #expect(failure(await verifier.verify(expired, now: now)) == .expired)
        let parts = try rs256Token(key, claims: claims()).split(separator: ".")
        let tampered = String(parts[0]) + "." + base64URL(json(claims(sub: "mallory"))) + "." + String(parts[2])
        #expect(failure(await verifier.verify(tampered, now: now)) == .badSignature)
        for alg in ["PS256", "RS384", "RS512", "ES256", "none"] {
            #expect(failure(await verifier.verify(try rs256Token(key, alg: alg, claims: claims()), now: now)) == .algorithmNotAllowed(alg))
        }
        // The classic confusion: the public key's PEM text used as an HMAC secret.
        for keyText in [pem, pem + "\n", pem.trimmingCharacters(in: .whitespacesAndNewlines)] {
            for alg in ["HS256", "HS384", "HS512"] {
                let token = hmacToken(alg: alg, key: Array(keyText.utf8), claims: claims(sub: "mallory", topics: ["*"]))
                #expect(failure(await verifier.verify(token, now: now)) == .algorithmNotAllowed(alg))
            }
        }
    }

    @Test("a PEM that is not a supported public key fails init")
    func badPEM() async {
        for pem in ["", "garbage", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"] {
            await #expect(throws: KeyError.self) { try await TokenVerifier(key: .publicKeyPEM(pem), grantTemplates: []) }
        }
    }
}
