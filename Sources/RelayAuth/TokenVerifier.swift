// TokenVerifier: who a relay token names and which topics it may read.
//
// Tokens are JWTs minted by the web application. jwt-kit checks signatures,
// but it picks the key by `kid` (falling back to its default key on an
// unknown one) and trusts the header otherwise, so the relay reads the header
// itself first: the size, `crit`, the `kid` (it must name a configured key),
// and the `alg` (it must be one the chosen key is for). Each key sits alone in
// its own jwt-kit collection, one per algorithm, so the library cannot fall
// back to another. A token can never choose how it is verified (`none`, or an
// HMAC made with a public key as secret). `jku`, `x5u`, `jwk` and `x5c` are
// never read. Time claims, `aud` and `iss` are checked here too; the leeway
// is 0 unless the operator sets one, because the relay promises to end a
// session at `exp`.

import Foundation
import JWTKit
import RelayHub
import Synchronization

/// A verified token: the subject, its grants, and when it stops being valid.
public struct Principal: Sendable, Equatable {
    public var subject: String
    public var grants: GrantSet
    /// Seconds since 1970; nil for a token without `exp`.
    public var expiresAt: Int64?
    /// `exp` plus the leeway, seconds since 1970: when the session ends. Nil without `exp`.
    public var validUntil: Double?

    public init(subject: String, grants: GrantSet, expiresAt: Int64?, validUntil: Double? = nil) {
        self.subject = subject
        self.grants = grants
        self.expiresAt = expiresAt
        self.validUntil = validUntil ?? expiresAt.map(Double.init)
    }
}

/// Why a token was refused. The message is for logs and error frames: it never holds the token.
public enum TokenError: Error, Equatable, Sendable, CustomStringConvertible {
    case missing
    case malformed
    /// Over a size limit: the token, its `topics` claim, or one of its entries.
    case tooLarge(String)
    case algorithmNotAllowed(String)
    /// The header has `crit`: extensions the relay does not implement (RFC 7515 §4.1.11).
    case criticalHeader
    /// The header's `kid` names no configured key.
    case unknownKey
    case badSignature
    case expired
    /// No `exp` claim, and the relay was not told to accept such tokens.
    case noExpiry
    case notYetValid
    /// `iat` later than now (plus the leeway).
    case issuedInFuture
    case wrongAudience
    case wrongIssuer
    case noSubject
    /// A `?ticket=` that stands for no token: unknown, used, expired, or issued to another origin.
    case badTicket(String)

    public var description: String {
        switch self {
        case .missing: return "no token"
        case .malformed: return "malformed token"
        case .tooLarge(let what): return "token too large: \(what)"
        case .algorithmNotAllowed(let alg): return "token algorithm \(alg) is not the key's"
        case .criticalHeader: return "token header has crit: no extension is supported"
        case .unknownKey: return "token kid names no configured key"
        case .badSignature: return "bad token signature"
        case .expired: return "token expired"
        case .noExpiry: return "token has no exp (the relay accepts such tokens only with --allow-tokens-without-exp)"
        case .notYetValid: return "token not yet valid"
        case .issuedInFuture: return "token issued in the future (iat)"
        case .wrongAudience: return "token aud does not name this relay"
        case .wrongIssuer: return "token iss is not the expected issuer"
        case .noSubject: return "token has no sub"
        case .badTicket(let why): return why
        }
    }

    /// A short label for metrics.
    public var reason: String {
        switch self {
        case .missing: return "missing"
        case .malformed: return "malformed"
        case .tooLarge: return "too_large"
        case .algorithmNotAllowed: return "algorithm"
        case .criticalHeader: return "header"
        case .unknownKey: return "kid"
        case .badSignature: return "signature"
        case .expired: return "expired"
        case .noExpiry: return "no_expiry"
        case .notYetValid, .issuedInFuture: return "not_yet_valid"
        case .wrongAudience: return "audience"
        case .wrongIssuer: return "issuer"
        case .noSubject: return "no_subject"
        case .badTicket: return "ticket"
        }
    }
}

/// Sizes past which a token is refused before any decoding (`token`) or granting (`topics`).
public enum TokenLimits {
    public static let tokenBytes = 8192
    public static let topics = 256
    public static let topicBytes = 256
    /// HS256 needs a secret at least as long as its digest (RFC 7518 §3.2); HS384 48, HS512 64.
    public static let secretBytes = 32
    /// The most `--jwt-leeway` may be.
    public static let maxLeeway = 300
}

/// A key the relay can verify with.
public enum VerificationKey: Sendable {
    /// An HMAC secret: HS256 (at least 32 bytes), HS384 (48) and HS512 (64).
    case secret([UInt8])
    /// A PEM public key: RS256 (RSA), ES256 (P-256) or EdDSA (Ed25519), by the key's type.
    case publicKeyPEM(String)
}

/// A key and the `kid` that names it.
public struct ConfiguredKey: Sendable {
    public var id: String
    public var key: VerificationKey

    public init(id: String, key: VerificationKey) {
        self.id = id
        self.key = key
    }
}

/// What a valid token must satisfy besides its signature.
public struct TokenRules: Sendable {
    public var grantTemplates: [GrantTemplate]
    /// A token without `exp` is valid forever, a stolen one too: refused unless asked for.
    public var allowsMissingExpiry: Bool
    /// When set, `aud` (a string, or an array of strings) must hold it.
    public var audience: String?
    /// When set, `iss` must be it.
    public var issuer: String?
    /// Seconds of clock skew allowed on `exp`, `nbf` and `iat`.
    public var leeway: Int

    public init(
        grantTemplates: [GrantTemplate] = [], allowsMissingExpiry: Bool = false, audience: String? = nil,
        issuer: String? = nil, leeway: Int = 0
    ) {
        self.grantTemplates = grantTemplates
        self.allowsMissingExpiry = allowsMissingExpiry
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
    }
}

public enum KeyError: Error, CustomStringConvertible, Equatable {
    case emptySecret
    case shortSecret(Int)
    case unsupportedPublicKey
    case noKeys
    case duplicateID(String)

    public var description: String {
        switch self {
        case .emptySecret: return "the secret is empty"
        case .shortSecret(let count):
            return "the secret is \(count) bytes; HS256 needs at least 32 (HS384 48, HS512 64): "
                + "make one with `head -c 32 /dev/urandom | base64`"
        case .unsupportedPublicKey: return "not a PEM RSA, P-256 or Ed25519 public key"
        case .noKeys: return "no key"
        case .duplicateID(let id): return "two keys with kid \(id)"
        }
    }
}

/// The `aud` claim: one string or an array of strings (RFC 7519 §4.1.3).
struct RelayAudience: Codable, Sendable, Equatable {
    var values: [String]

    init(_ values: [String]) { self.values = values }

    init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if let one = try? container.decode(String.self) {
            values = [one]
        } else {
            values = try container.decode([String].self)
        }
    }

    func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        if values.count == 1 { try container.encode(values[0]) } else { try container.encode(values) }
    }
}

struct RelayClaims: JWTPayload {
    var sub: String?
    var exp: Double?
    var nbf: Double?
    var iat: Double?
    var aud: RelayAudience?
    var iss: String?
    var topics: [String]?

    init(
        sub: String?, exp: Double?, nbf: Double?, iat: Double? = nil, aud: RelayAudience? = nil, iss: String? = nil,
        topics: [String]?
    ) {
        self.sub = sub
        self.exp = exp
        self.nbf = nbf
        self.iat = iat
        self.aud = aud
        self.iss = iss
        self.topics = topics
    }

    func verify(using algorithm: some JWTAlgorithm) async throws {}
}

/// The configured keys, each alone in one collection per algorithm it verifies.
struct KeyRing: Sendable {
    struct Entry: Sendable {
        let id: String
        let algorithm: String
        let collection: JWTKeyCollection
    }

    let entries: [Entry]
    let ids: Set<String>
    let count: Int

    static func make(_ keys: [ConfiguredKey]) async throws -> KeyRing {
        guard !keys.isEmpty else { throw KeyError.noKeys }
        var entries = [Entry]()
        var ids = Set<String>()
        for configured in keys {
            guard ids.insert(configured.id).inserted else { throw KeyError.duplicateID(configured.id) }
            switch configured.key {
            case .secret(let secret):
                guard !secret.isEmpty else { throw KeyError.emptySecret }
                guard secret.count >= TokenLimits.secretBytes else { throw KeyError.shortSecret(secret.count) }
                // RFC 7518 §3.2: a key at least as long as the hash output; no padding of shorter ones.
                for (alg, digest, size) in [("HS256", DigestAlgorithm.sha256, 32), ("HS384", .sha384, 48), ("HS512", .sha512, 64)]
                where secret.count >= size {
                    let collection = await JWTKeyCollection().add(hmac: HMACKey(from: secret), digestAlgorithm: digest)
                    entries.append(Entry(id: configured.id, algorithm: alg, collection: collection))
                }
            case .publicKeyPEM(let pem):
                let alg: String
                let collection: JWTKeyCollection
                if let rsa = try? Insecure.RSA.PublicKey(pem: pem) {
                    (alg, collection) = ("RS256", await JWTKeyCollection().add(rsa: rsa, digestAlgorithm: .sha256))
                } else if let ec = try? ES256PublicKey(pem: pem) {
                    (alg, collection) = ("ES256", await JWTKeyCollection().add(ecdsa: ec))
                } else if let ed = try? EdDSA.PublicKey(pem: pem) {
                    (alg, collection) = ("EdDSA", await JWTKeyCollection().add(eddsa: ed))
                } else {
                    throw KeyError.unsupportedPublicKey
                }
                entries.append(Entry(id: configured.id, algorithm: alg, collection: collection))
            }
        }
        return KeyRing(entries: entries, ids: ids, count: keys.count)
    }
}

public final class TokenVerifier: Sendable {
    private let ring: Mutex<KeyRing>
    private let rules: TokenRules

    /// Algorithms some configured key verifies.
    public var algorithms: [String] { Set(ring.withLock { $0.entries.map(\.algorithm) }).sorted() }
    /// How many keys are configured.
    public var keyCount: Int { ring.withLock { $0.count } }
    /// The configured keys' ids, sorted.
    public var keyIDs: [String] { ring.withLock { $0.ids.sorted() } }

    public init(keys: [ConfiguredKey], rules: TokenRules) async throws {
        self.ring = Mutex(try await KeyRing.make(keys))
        self.rules = rules
    }

    /// One key, named `key`.
    public convenience init(key: VerificationKey, grantTemplates: [GrantTemplate], allowsMissingExpiry: Bool = false) async throws {
        try await self.init(
            keys: [ConfiguredKey(id: "key", key: key)],
            rules: TokenRules(grantTemplates: grantTemplates, allowsMissingExpiry: allowsMissingExpiry))
    }

    /// Throws the reason `key` cannot be used (a short secret, a PEM that is no supported public key).
    public static func check(_ key: VerificationKey) async throws {
        _ = try await KeyRing.make([ConfiguredKey(id: "check", key: key)])
    }

    /// Replaces every key at once; on an error the old keys stay.
    public func replaceKeys(_ keys: [ConfiguredKey]) async throws {
        let fresh = try await KeyRing.make(keys)
        ring.withLock { $0 = fresh }
    }

    /// Verifies `token` at `now`; never throws, never logs the token.
    public func verify(_ token: String?, now: Date = Date()) async -> Result<Principal, TokenError> {
        guard let token, !token.isEmpty else { return .failure(.missing) }
        // Before any base64 or JSON work: a huge token costs nothing but this count.
        guard token.utf8.count <= TokenLimits.tokenBytes else {
            return .failure(.tooLarge("over \(TokenLimits.tokenBytes) bytes"))
        }
        let header: Header
        switch Self.header(token) {
        case .failure(let error): return .failure(error)
        case .success(let read): header = read
        }
        let ring = self.ring.withLock { $0 }
        let candidates: [KeyRing.Entry]
        if let kid = header.kid {
            guard ring.ids.contains(kid) else { return .failure(.unknownKey) }
            candidates = ring.entries.filter { $0.id == kid && $0.algorithm == header.alg }
        } else {
            candidates = Array(ring.entries.filter { $0.algorithm == header.alg }.prefix(2))
        }
        guard !candidates.isEmpty else { return .failure(.algorithmNotAllowed(header.alg)) }
        var verified: RelayClaims?
        for candidate in candidates {
            do {
                verified = try await candidate.collection.verify(token, as: RelayClaims.self)
                break
            } catch let error as JWTError where error.errorType == .signatureVerificationFailed {
                continue
            } catch {
                return .failure(.malformed)
            }
        }
        guard let claims = verified else { return .failure(.badSignature) }
        return check(claims, now: now.timeIntervalSince1970)
    }

    /// `exp` in whole seconds; one past Int64's range (a valid token may say 1e19, FuzzToken found
    /// that `Int64(_:)` trapped on it) is Int64.max: it never comes.
    static func wholeSeconds(_ exp: Double) -> Int64 {
        exp < 0x1p63 ? Int64(exp.rounded(.down)) : .max
    }

    private func check(_ claims: RelayClaims, now: Double) -> Result<Principal, TokenError> {
        let leeway = Double(rules.leeway)
        if let exp = claims.exp, now >= exp + leeway { return .failure(.expired) }
        if claims.exp == nil, !rules.allowsMissingExpiry { return .failure(.noExpiry) }
        if let nbf = claims.nbf, now + leeway < nbf { return .failure(.notYetValid) }
        if let iat = claims.iat, iat > now + leeway { return .failure(.issuedInFuture) }
        if let audience = rules.audience, !(claims.aud?.values.contains(audience) ?? false) {
            return .failure(.wrongAudience)
        }
        if let issuer = rules.issuer, claims.iss != issuer { return .failure(.wrongIssuer) }
        let topics = claims.topics ?? []
        guard topics.count <= TokenLimits.topics else {
            return .failure(.tooLarge("over \(TokenLimits.topics) topics"))
        }
        guard topics.allSatisfy({ $0.utf8.count <= TokenLimits.topicBytes }) else {
            return .failure(.tooLarge("a topic over \(TokenLimits.topicBytes) bytes"))
        }
        guard let sub = claims.sub, !sub.isEmpty else { return .failure(.noSubject) }
        // A `sub` that is empty, holds `*` or leaves the topic alphabet gets no `{sub}` grant (GrantTemplate).
        let granted = topics + rules.grantTemplates.compactMap { $0.grant(forSubject: sub) }
        return .success(
            Principal(
                subject: sub, grants: GrantSet(granted), expiresAt: claims.exp.map(Self.wholeSeconds),
                validUntil: claims.exp.map { $0 + leeway }))
    }

    /// A token's header as the relay reads it. `@_spi(Fuzzing)` public, with `header(_:)`, only so that
    /// the fuzz checks (FuzzChecks, Fuzz/) can compare it with what `verify` does; not part of the API.
    @_spi(Fuzzing) public struct Header: Equatable, Sendable {
        public var alg: String
        public var kid: String?

        public init(alg: String, kid: String?) {
            self.alg = alg
            self.kid = kid
        }
    }

    /// The header's `alg` and `kid`, read before any key is chosen; `crit` refuses the token.
    @_spi(Fuzzing) public static func header(_ token: String) -> Result<Header, TokenError> {
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3, let data = Base64URL.decode(parts[0]),
            let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
            let alg = object["alg"] as? String
        else { return .failure(.malformed) }
        // RFC 7515 §4.1.11: extensions named in crit must be understood; the relay understands none.
        guard object["crit"] == nil else { return .failure(.criticalHeader) }
        var kid: String?
        if let value = object["kid"] {
            guard let text = value as? String else { return .failure(.malformed) }
            kid = text
        }
        return .success(Header(alg: alg, kid: kid))
    }

    /// The `alg` of the token's header.
    static func headerAlgorithm(_ token: String) -> String? {
        if case .success(let header) = header(token) { return header.alg }
        return nil
    }
}

enum Base64URL {
    static func decode(_ text: Substring) -> Data? {
        var base64 = text.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        while base64.count % 4 != 0 { base64.append("=") }
        return Data(base64Encoded: base64)
    }
}
