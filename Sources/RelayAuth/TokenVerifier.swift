// TokenVerifier: who a relay token names and which topics it may read.
//
// Tokens are JWTs minted by the web application. jwt-kit checks signatures,
// but it picks the key by `kid` and trusts the header otherwise, so the
// header's `alg` is checked here against the one algorithm the configured
// key is for: a token can never choose how it is verified (`none`, or an
// HMAC made with a public key as secret). Time claims are checked here too,
// with no leeway, because the relay promises to end a session at `exp`.

import Foundation
import JWTKit
import RelayHub

/// A verified token: the subject, its grants, and when it stops being valid.
public struct Principal: Sendable, Equatable {
    public var subject: String
    public var grants: GrantSet
    /// Seconds since 1970; nil for a token without `exp`.
    public var expiresAt: Int64?

    public init(subject: String, grants: GrantSet, expiresAt: Int64?) {
        self.subject = subject
        self.grants = grants
        self.expiresAt = expiresAt
    }
}

/// Why a token was refused. The message is for logs and error frames: it never holds the token.
public enum TokenError: Error, Equatable, Sendable, CustomStringConvertible {
    case missing
    case malformed
    case algorithmNotAllowed(String)
    case badSignature
    case expired
    /// No `exp` claim, and the relay was not told to accept such tokens.
    case noExpiry
    case notYetValid
    case noSubject

    public var description: String {
        switch self {
        case .missing: return "no token"
        case .malformed: return "malformed token"
        case .algorithmNotAllowed(let alg): return "token algorithm \(alg) is not the key's"
        case .badSignature: return "bad token signature"
        case .expired: return "token expired"
        case .noExpiry: return "token has no exp (the relay accepts such tokens only with --allow-tokens-without-exp)"
        case .notYetValid: return "token not yet valid"
        case .noSubject: return "token has no sub"
        }
    }

    /// A short label for metrics.
    public var reason: String {
        switch self {
        case .missing: return "missing"
        case .malformed: return "malformed"
        case .algorithmNotAllowed: return "algorithm"
        case .badSignature: return "signature"
        case .expired: return "expired"
        case .noExpiry: return "no_expiry"
        case .notYetValid: return "not_yet_valid"
        case .noSubject: return "no_subject"
        }
    }
}

/// A key the relay can verify with.
public enum VerificationKey: Sendable {
    /// An HMAC secret: HS256, HS384 and HS512 tokens.
    case secret([UInt8])
    /// A PEM public key: RS256 (RSA), ES256 (P-256) or EdDSA (Ed25519), by the key's type.
    case publicKeyPEM(String)
}

public enum KeyError: Error, CustomStringConvertible {
    case emptySecret
    case unsupportedPublicKey

    public var description: String {
        switch self {
        case .emptySecret: return "the secret is empty"
        case .unsupportedPublicKey: return "not a PEM RSA, P-256 or Ed25519 public key"
        }
    }
}

struct RelayClaims: JWTPayload {
    var sub: String?
    var exp: Double?
    var nbf: Double?
    var topics: [String]?

    func verify(using algorithm: some JWTAlgorithm) async throws {}
}

public final class TokenVerifier: Sendable {
    /// One key collection per accepted `alg`, so the header cannot pick another.
    private let keys: [String: JWTKeyCollection]
    private let templates: [GrantTemplate]
    /// A token without `exp` is valid forever, a stolen one too: refused unless asked for.
    private let allowsMissingExpiry: Bool

    public var algorithms: [String] { keys.keys.sorted() }

    public init(key: VerificationKey, grantTemplates: [GrantTemplate], allowsMissingExpiry: Bool = false) async throws {
        var keys = [String: JWTKeyCollection]()
        switch key {
        case .secret(let secret):
            guard !secret.isEmpty else { throw KeyError.emptySecret }
            for (alg, digest, size) in [("HS256", DigestAlgorithm.sha256, 32), ("HS384", .sha384, 48), ("HS512", .sha512, 64)] {
                keys[alg] = await JWTKeyCollection().add(hmac: HMACKey.padded(secret, to: size), digestAlgorithm: digest)
            }
        case .publicKeyPEM(let pem):
            if let rsa = try? Insecure.RSA.PublicKey(pem: pem) {
                keys["RS256"] = await JWTKeyCollection().add(rsa: rsa, digestAlgorithm: .sha256)
            } else if let ec = try? ES256PublicKey(pem: pem) {
                keys["ES256"] = await JWTKeyCollection().add(ecdsa: ec)
            } else if let ed = try? EdDSA.PublicKey(pem: pem) {
                keys["EdDSA"] = await JWTKeyCollection().add(eddsa: ed)
            } else {
                throw KeyError.unsupportedPublicKey
            }
        }
        self.keys = keys
        self.templates = grantTemplates
        self.allowsMissingExpiry = allowsMissingExpiry
    }

    /// Verifies `token` at `now`; never throws, never logs the token.
    public func verify(_ token: String?, now: Date = Date()) async -> Result<Principal, TokenError> {
        guard let token, !token.isEmpty else { return .failure(.missing) }
        guard let alg = Self.headerAlgorithm(token) else { return .failure(.malformed) }
        guard let collection = keys[alg] else { return .failure(.algorithmNotAllowed(alg)) }
        let claims: RelayClaims
        do {
            claims = try await collection.verify(token, as: RelayClaims.self)
        } catch let error as JWTError where error.errorType == .signatureVerificationFailed {
            return .failure(.badSignature)
        } catch {
            return .failure(.malformed)
        }
        let seconds = now.timeIntervalSince1970
        if let exp = claims.exp, seconds >= exp { return .failure(.expired) }
        if claims.exp == nil, !allowsMissingExpiry { return .failure(.noExpiry) }
        if let nbf = claims.nbf, seconds < nbf { return .failure(.notYetValid) }
        guard let sub = claims.sub, !sub.isEmpty else { return .failure(.noSubject) }
        let granted = (claims.topics ?? []) + templates.compactMap { $0.grant(forSubject: sub) }
        return .success(
            Principal(subject: sub, grants: GrantSet(granted), expiresAt: claims.exp.map { Int64($0.rounded(.down)) }))
    }

    /// The `alg` of the token's header, read before any key is chosen.
    static func headerAlgorithm(_ token: String) -> String? {
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3, let header = Base64URL.decode(parts[0]),
            let object = try? JSONSerialization.jsonObject(with: header) as? [String: Any],
            let alg = object["alg"] as? String
        else { return nil }
        return alg
    }
}

extension HMACKey {
    /// jwt-kit asserts that a key is at least as long as the digest. HMAC itself pads a
    /// shorter key with zero bytes to the block size (RFC 2104), so padding it here to
    /// the digest size signs and verifies exactly as the plain key does elsewhere.
    static func padded(_ secret: [UInt8], to size: Int) -> HMACKey {
        HMACKey(from: secret.count >= size ? secret : secret + [UInt8](repeating: 0, count: size - secret.count))
    }
}

enum Base64URL {
    static func decode(_ text: Substring) -> Data? {
        var base64 = text.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        while base64.count % 4 != 0 { base64.append("=") }
        return Data(base64Encoded: base64)
    }
}
