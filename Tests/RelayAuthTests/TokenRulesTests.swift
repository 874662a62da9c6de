// Token rules of issue 14: sizes before work, HMAC key lengths, `crit` and the header fields the
// relay never uses, kids and two keys per algorithm, reloading keys, `aud` and `iss`, leeway, and
// `{sub}` templates. Tokens are made by hand (base64url JSON, swift-crypto signatures).

import Crypto
import Foundation
import RelayHub
import Testing

@testable import RelayAuth

private let now = Date(timeIntervalSince1970: 1_700_000_000)
private let t0 = 1_700_000_000

private func b64(_ data: some DataProtocol) -> String {
    Data(data).base64EncodedString()
        .replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
        .replacingOccurrences(of: "=", with: "")
}

private func json(_ object: [String: Any]) -> Data {
    try! JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])
}

private func hs(
    _ key: [UInt8], alg: String = "HS256", header extra: [String: Any] = [:], _ claims: [String: Any]
) -> String {
    var header: [String: Any] = ["alg": alg, "typ": "JWT"]
    header.merge(extra) { _, new in new }
    let input = b64(json(header)) + "." + b64(json(claims))
    let k = SymmetricKey(data: key)
    let data = Data(input.utf8)
    let mac: [UInt8]
    switch alg {
    case "HS384": mac = Array(HMAC<SHA384>.authenticationCode(for: data, using: k))
    case "HS512": mac = Array(HMAC<SHA512>.authenticationCode(for: data, using: k))
    default: mac = Array(HMAC<SHA256>.authenticationCode(for: data, using: k))
    }
    return input + "." + b64(mac)
}

private func es(_ key: P256.Signing.PrivateKey, header extra: [String: Any] = [:], _ claims: [String: Any]) throws -> String {
    var header: [String: Any] = ["alg": "ES256", "typ": "JWT"]
    header.merge(extra) { _, new in new }
    let input = b64(json(header)) + "." + b64(json(claims))
    return input + "." + b64(try key.signature(for: Data(input.utf8)).rawRepresentation)
}

private func claims(sub: String = "alice", exp: Int? = t0 + 600, _ more: [String: Any] = [:]) -> [String: Any] {
    var out: [String: Any] = ["sub": sub, "topics": ["task:1"]]
    if let exp { out["exp"] = exp }
    out.merge(more) { _, new in new }
    return out
}

private func key(_ byte: UInt8, _ count: Int = 64) -> [UInt8] { [UInt8](repeating: byte, count: count) }

private let keyA = key(0x41)
private let keyB = key(0x42)
private let keyC = key(0x43)

private func verifier(
    _ keys: [(String, VerificationKey)] = [("a", .secret(keyA))], rules: TokenRules = TokenRules()
) async throws -> TokenVerifier {
    try await TokenVerifier(keys: keys.map { ConfiguredKey(id: $0.0, key: $0.1) }, rules: rules)
}

private func failure(_ result: Result<Principal, TokenError>) -> TokenError? {
    if case .failure(let error) = result { return error }
    return nil
}

private func principal(_ result: Result<Principal, TokenError>) -> Principal? {
    if case .success(let principal) = result { return principal }
    return nil
}

@Suite("Token rules: sizes")
struct TokenSizeTests {
    @Test("a token over 8 KiB is refused before any decoding; 8 KiB exactly is read")
    func tokenSize() async throws {
        let v = try await verifier()
        // Not even base64: the size alone refuses it.
        let junk = String(repeating: "!", count: 8193)
        #expect(failure(await v.verify(junk, now: now)) == .tooLarge("over 8192 bytes"))
        #expect(failure(await v.verify(junk, now: now))?.reason == "too_large")
        // A valid token padded to 8193 bytes with a claim: refused; to 8192: accepted.
        let base = hs(keyA, claims(["pad": ""]))
        let room = 8192 - base.count
        func padded(_ extra: Int) -> String {
            // base64url grows 4 characters per 3 bytes; search for the pad length that lands exactly.
            var n = (room + extra) * 3 / 4
            while true {
                let t = hs(keyA, claims(["pad": String(repeating: "x", count: n)]))
                if t.count == 8192 + extra { return t }
                if t.count > 8192 + extra { n -= 1 } else { n += 1 }
                if n < 0 { return "" }
            }
        }
        let exact = padded(0)
        if exact.count == 8192 { #expect(principal(await v.verify(exact, now: now)) != nil) }
        let over = padded(1)
        if over.count == 8193 { #expect(failure(await v.verify(over, now: now)) == .tooLarge("over 8192 bytes")) }
        #expect(exact.count == 8192 || over.count == 8193)
    }

    @Test("topics: 256 entries of 256 bytes are fine in principle; 257 entries or a 257-byte entry are refused")
    func topicsLimits() async throws {
        let v = try await verifier()
        let many = (0..<257).map { "t\($0)" }
        #expect(failure(await v.verify(hs(keyA, claims(["topics": many])), now: now)) == .tooLarge("over 256 topics"))
        let enough = Array(many.prefix(256))
        #expect(principal(await v.verify(hs(keyA, claims(["topics": enough])), now: now))?.grants.covers("t255") == true)
        let long = String(repeating: "a", count: 257)
        #expect(
            failure(await v.verify(hs(keyA, claims(["topics": ["ok", long]])), now: now))
                == .tooLarge("a topic over 256 bytes"))
        let longest = String(repeating: "a", count: 256)
        #expect(principal(await v.verify(hs(keyA, claims(["topics": [longest]])), now: now))?.grants.covers(longest) == true)
        // Multi-byte characters count as bytes.
        let wide = String(repeating: "é", count: 129)
        #expect(failure(await v.verify(hs(keyA, claims(["topics": [wide]])), now: now)) == .tooLarge("a topic over 256 bytes"))
    }
}

@Suite("Token rules: header")
struct TokenHeaderTests {
    @Test("a header with crit is refused, whatever it lists", arguments: [["exp"], ["b64"], [], ["kid"]] as [[String]])
    func crit(list: [String]) async throws {
        let v = try await verifier()
        let token = hs(keyA, header: ["crit": list, "b64": true], claims())
        #expect(failure(await v.verify(token, now: now)) == .criticalHeader)
        #expect(failure(await v.verify(token, now: now))?.reason == "header")
        // crit of any JSON type too.
        #expect(failure(await v.verify(hs(keyA, header: ["crit": "exp"], claims()), now: now)) == .criticalHeader)
    }

    @Test("jku, x5u, jwk and x5c are never used: an attacker's key in the header verifies nothing")
    func headerKeysIgnored() async throws {
        let v = try await verifier()
        let mallory = key(0x4D)
        let embedded: [[String: Any]] = [
            ["jku": "https://evil.example/jwks.json"], ["x5u": "https://evil.example/cert.pem"],
            ["jwk": ["kty": "oct", "k": b64(mallory)]], ["x5c": ["MIIB"]],
        ]
        for header in embedded {
            #expect(failure(await v.verify(hs(mallory, header: header, claims()), now: now)) == .badSignature, "\(header)")
            // With the real key they change nothing: the relay does not read them.
            #expect(principal(await v.verify(hs(keyA, header: header, claims()), now: now)) != nil, "\(header)")
        }
        // An ES256 token whose header carries its own public key, against a P-256 verifier of another key.
        let real = P256.Signing.PrivateKey()
        let attacker = P256.Signing.PrivateKey()
        let ev = try await verifier([("p", .publicKeyPEM(real.publicKey.pemRepresentation))])
        let jwk: [String: Any] = ["kty": "EC", "crv": "P-256", "x": b64(attacker.publicKey.rawRepresentation.prefix(32)),
            "y": b64(attacker.publicKey.rawRepresentation.suffix(32))]
        #expect(failure(await ev.verify(try es(attacker, header: ["jwk": jwk], claims()), now: now)) == .badSignature)
    }
}

@Suite("Token rules: algorithms and keys")
struct TokenKeyTests {
    @Test("algorithm confusion each way: HS tokens against a public key, ES256 against a secret, none anywhere")
    func confusion() async throws {
        let p256 = P256.Signing.PrivateKey()
        let pem = p256.publicKey.pemRepresentation
        let secretOnly = try await verifier()
        let pemOnly = try await verifier([("p", .publicKeyPEM(pem))])
        // A library accepting both kinds of key still checks each token only with its algorithm's keys.
        let both = try await verifier([("a", .secret(keyA)), ("p", .publicKeyPEM(pem))])
        #expect(both.algorithms == ["ES256", "HS256", "HS384", "HS512"])
        let hsWithPEM = hs(Array(pem.utf8), claims())
        #expect(failure(await pemOnly.verify(hsWithPEM, now: now)) == .algorithmNotAllowed("HS256"))
        #expect(failure(await both.verify(hsWithPEM, now: now)) == .badSignature)
        #expect(failure(await both.verify(hs(Array(pem.utf8), header: ["kid": "p"], claims()), now: now)) == .algorithmNotAllowed("HS256"))
        let esToken = try es(p256, claims())
        #expect(failure(await secretOnly.verify(esToken, now: now)) == .algorithmNotAllowed("ES256"))
        #expect(principal(await both.verify(esToken, now: now)) != nil)
        #expect(failure(await both.verify(try es(p256, header: ["kid": "a"], claims()), now: now)) == .algorithmNotAllowed("ES256"))
        for v in [secretOnly, pemOnly, both] {
            let unsigned = b64(json(["alg": "none"])) + "." + b64(json(claims())) + "."
            #expect(failure(await v.verify(unsigned, now: now)) == .algorithmNotAllowed("none"))
        }
    }

    @Test("two keys: a token without kid verifies with either; with kid only with that one")
    func twoKeys() async throws {
        let v = try await verifier([("new", .secret(keyA)), ("old", .secret(keyB))])
        #expect(v.keyCount == 2)
        #expect(v.keyIDs == ["new", "old"])
        #expect(principal(await v.verify(hs(keyA, claims()), now: now)) != nil)
        #expect(principal(await v.verify(hs(keyB, claims()), now: now)) != nil)
        #expect(principal(await v.verify(hs(keyB, header: ["kid": "old"], claims()), now: now)) != nil)
        #expect(failure(await v.verify(hs(keyB, header: ["kid": "new"], claims()), now: now)) == .badSignature)
        #expect(failure(await v.verify(hs(keyB, header: ["kid": "older"], claims()), now: now)) == .unknownKey)
        #expect(failure(await v.verify(hs(keyC, claims()), now: now)) == .badSignature)
    }

    @Test("a token without kid is tried against at most two keys of its algorithm")
    func atMostTwo() async throws {
        let v = try await verifier([("a", .secret(keyA)), ("b", .secret(keyB)), ("c", .secret(keyC))])
        #expect(principal(await v.verify(hs(keyB, claims()), now: now)) != nil)
        #expect(failure(await v.verify(hs(keyC, claims()), now: now)) == .badSignature)
        #expect(principal(await v.verify(hs(keyC, header: ["kid": "c"], claims()), now: now)) != nil)
    }

    @Test("two keys with one kid are refused; no key is refused")
    func duplicateIDs() async {
        await #expect(throws: KeyError.duplicateID("a")) { try await verifier([("a", .secret(keyA)), ("a", .secret(keyB))]) }
        await #expect(throws: KeyError.noKeys) { try await verifier([]) }
    }

    @Test("replaceKeys swaps every key at once; a failing set keeps the old keys")
    func reload() async throws {
        let v = try await verifier([("a", .secret(keyA)), ("b", .secret(keyB))])
        try await v.replaceKeys([ConfiguredKey(id: "a", key: .secret(keyC)), ConfiguredKey(id: "b", key: .secret(keyB))])
        #expect(failure(await v.verify(hs(keyA, claims()), now: now)) == .badSignature)
        #expect(principal(await v.verify(hs(keyC, header: ["kid": "a"], claims()), now: now)) != nil)
        await #expect(throws: KeyError.shortSecret(5)) {
            try await v.replaceKeys([ConfiguredKey(id: "a", key: .secret(Array("short".utf8)))])
        }
        #expect(v.keyCount == 2)
        #expect(principal(await v.verify(hs(keyC, claims()), now: now)) != nil)
        #expect(principal(await v.verify(hs(keyB, claims()), now: now)) != nil)
    }
}

@Suite("Token rules: audience and issuer")
struct TokenAudienceTests {
    @Test("aud: a string or an array holding the audience; missing or other: refused")
    func audience() async throws {
        let v = try await verifier(rules: TokenRules(audience: "progress-relay"))
        #expect(principal(await v.verify(hs(keyA, claims(["aud": "progress-relay"])), now: now)) != nil)
        #expect(principal(await v.verify(hs(keyA, claims(["aud": ["web", "progress-relay"]])), now: now)) != nil)
        for aud in ["other", ["web"], [], "Progress-Relay"] as [Any] {
            #expect(failure(await v.verify(hs(keyA, claims(["aud": aud])), now: now)) == .wrongAudience, "\(aud)")
        }
        #expect(failure(await v.verify(hs(keyA, claims()), now: now)) == .wrongAudience)
        #expect(failure(await v.verify(hs(keyA, claims(["aud": 5])), now: now)) == .malformed)
        // Without --jwt-audience any aud (or none) is accepted.
        let any = try await verifier()
        #expect(principal(await any.verify(hs(keyA, claims(["aud": "other"])), now: now)) != nil)
    }

    @Test("iss must be the issuer when one is set")
    func issuer() async throws {
        let v = try await verifier(rules: TokenRules(issuer: "https://app.example"))
        #expect(principal(await v.verify(hs(keyA, claims(["iss": "https://app.example"])), now: now)) != nil)
        #expect(failure(await v.verify(hs(keyA, claims(["iss": "https://evil.example"])), now: now)) == .wrongIssuer)
        #expect(failure(await v.verify(hs(keyA, claims()), now: now)) == .wrongIssuer)
        let any = try await verifier()
        #expect(principal(await any.verify(hs(keyA, claims(["iss": "whoever"])), now: now)) != nil)
    }
}

@Suite("Token rules: leeway")
struct TokenLeewayTests {
    @Test("no leeway by default: exp, nbf and a future iat bite at the second")
    func none() async throws {
        let v = try await verifier()
        #expect(failure(await v.verify(hs(keyA, claims(exp: t0)), now: now)) == .expired)
        #expect(failure(await v.verify(hs(keyA, claims(["nbf": t0 + 1])), now: now)) == .notYetValid)
        #expect(failure(await v.verify(hs(keyA, claims(["iat": t0 + 1])), now: now)) == .issuedInFuture)
        #expect(principal(await v.verify(hs(keyA, claims(["iat": t0, "nbf": t0])), now: now)) != nil)
        let p = principal(await v.verify(hs(keyA, claims(exp: t0 + 10)), now: now))
        #expect(p?.validUntil == Double(t0 + 10))
    }

    @Test("--jwt-leeway 30: valid until exp + 30, from nbf - 30, iat up to now + 30")
    func thirty() async throws {
        let v = try await verifier(rules: TokenRules(leeway: 30))
        let expToken = hs(keyA, claims(exp: t0))
        #expect(principal(await v.verify(expToken, now: now.addingTimeInterval(29.999))) != nil)
        #expect(failure(await v.verify(expToken, now: now.addingTimeInterval(30))) == .expired)
        let p = principal(await v.verify(expToken, now: now))
        #expect(p?.expiresAt == Int64(t0))
        #expect(p?.validUntil == Double(t0 + 30))
        let nbf = hs(keyA, claims(["nbf": t0 + 30]))
        #expect(principal(await v.verify(nbf, now: now)) != nil)
        #expect(failure(await v.verify(nbf, now: now.addingTimeInterval(-0.001))) == .notYetValid)
        let iat = hs(keyA, claims(["iat": t0 + 30]))
        #expect(principal(await v.verify(iat, now: now)) != nil)
        #expect(failure(await v.verify(hs(keyA, claims(["iat": t0 + 31])), now: now)) == .issuedInFuture)
        #expect(failure(await v.verify(hs(keyA, claims(["iat": t0 + 31])), now: now))?.reason == "not_yet_valid")
    }
}

@Suite("Token rules: {sub} templates")
struct TokenSubTemplateTests {
    @Test(
        "a sub that is empty, holds * or leaves the topic alphabet gets no {sub} grant",
        arguments: ["*", "a*", "*b", "a b", "ä", "a\u{0}b", "a,b", "a{sub}", String(repeating: "x", count: 300)])
    func refused(sub: String) async throws {
        let v = try await verifier(rules: TokenRules(grantTemplates: ["user:{sub}:*", "{sub}"].compactMap(GrantTemplate.init)))
        let p = try #require(principal(await v.verify(hs(keyA, claims(sub: sub, ["topics": []])), now: now)))
        #expect(p.grants.isEmpty, "sub \(sub)")
        #expect(!p.grants.covers("user:x:1"))
        // The empty sub: no grant either, because the token is refused.
        #expect(failure(await v.verify(hs(keyA, claims(sub: "", ["topics": []])), now: now)) == .noSubject)
    }

    @Test("a sub of topic characters gets its grants", arguments: ["alice", "u-1_2.3:4/5@6=7"])
    func granted(sub: String) async throws {
        let v = try await verifier(rules: TokenRules(grantTemplates: ["user:{sub}:*"].compactMap(GrantTemplate.init)))
        let p = try #require(principal(await v.verify(hs(keyA, claims(sub: sub, ["topics": []])), now: now)))
        #expect(p.grants == GrantSet(["user:\(sub):*"]))
    }
}
