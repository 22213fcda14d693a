using System.Net.Security;
using System.Runtime.CompilerServices;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using UblkSharp.Interop.GnuTls;

namespace UblkSharp.Nbd;

/// <summary>Whether clients may or must switch to TLS (NBD_OPT_STARTTLS) before choosing an export.</summary>
public enum NbdTlsMode
{
    /// <summary>No TLS: STARTTLS is answered NBD_REP_ERR_UNSUP.</summary>
    Off,

    /// <summary>TLS for clients that ask for it; plain clients are served too (the protocol's SELECTIVETLS with every export open).</summary>
    On,

    /// <summary>
    /// TLS or nothing (the protocol's FORCEDTLS): before STARTTLS every option but ABORT is answered
    /// NBD_REP_ERR_TLS_REQD and EXPORT_NAME ends the connection, so nothing about the exports leaks.
    /// </summary>
    Require,
}

/// <summary>
/// The server's credentials: x509 (a certificate, in the layout qemu and nbdkit use) or a
/// pre-shared key file (psktool's format), exactly one of them.
/// </summary>
public sealed record NbdTlsOptions
{
    public NbdTlsMode Mode { get; init; } = NbdTlsMode.Require;

    /// <summary>The server's certificate, with its private key (x509).</summary>
    public X509Certificate2? Certificate { get; init; }

    /// <summary>
    /// A psktool key file (<c>username:hexkey</c> lines): clients prove they hold one of its keys
    /// (TLS-PSK, through GnuTLS). GnuTLS reads it at every handshake, so a key added or removed
    /// counts from the next client on.
    /// </summary>
    public string? PskFile { get; init; }

    /// <summary>
    /// Ask clients for a certificate and accept only one that chains to <see cref="TrustedCertificates"/>
    /// (qemu's verify-peer, nbdkit's --tls-verify-peer).
    /// </summary>
    public bool VerifyPeer { get; init; }

    /// <summary>The CA (or CAs) client certificates must chain to, with <see cref="VerifyPeer"/>.</summary>
    public X509Certificate2Collection TrustedCertificates { get; init; } = [];

    /// <summary>
    /// Loads ca-cert.pem, server-cert.pem and server-key.pem from <paramref name="directory"/>.
    /// Throws <see cref="ArgumentException"/> naming the file that is missing or unusable.
    /// </summary>
    public static NbdTlsOptions Load(string directory, NbdTlsMode mode, bool verifyPeer)
    {
        if (!Directory.Exists(directory))
        {
            throw new ArgumentException($"TLS certificates directory {directory} does not exist");
        }
        var certPath = Path.Combine(directory, "server-cert.pem");
        var keyPath = Path.Combine(directory, "server-key.pem");
        var caPath = Path.Combine(directory, "ca-cert.pem");
        foreach (var path in verifyPeer ? new[] { certPath, keyPath, caPath } : [certPath, keyPath])
        {
            if (!File.Exists(path))
            {
                throw new ArgumentException($"{path} is missing (the directory needs server-cert.pem, server-key.pem{(verifyPeer ? " and ca-cert.pem" : "")})");
            }
        }
        X509Certificate2 certificate;
        try
        {
            using var pem = X509Certificate2.CreateFromPemFile(certPath, keyPath);
            if (!pem.HasPrivateKey)
            {
                throw new ArgumentException($"{keyPath} holds no private key for {certPath}");
            }
            // CreateFromPemFile gives an ephemeral key, which TLS on some platforms cannot use;
            // a round trip through PKCS#12 makes it an ordinary one.
            certificate = X509CertificateLoader.LoadPkcs12(pem.Export(X509ContentType.Pkcs12), null);
        }
        catch (CryptographicException e)
        {
            throw new ArgumentException($"cannot load {certPath} with {keyPath}: {e.Message}", e);
        }
        var trusted = new X509Certificate2Collection();
        if (File.Exists(caPath))
        {
            try
            {
                trusted.ImportFromPemFile(caPath);
            }
            catch (CryptographicException e)
            {
                throw new ArgumentException($"cannot load {caPath}: {e.Message}", e);
            }
            if (trusted.Count == 0 && verifyPeer)
            {
                throw new ArgumentException($"{caPath} holds no certificate");
            }
        }
        var now = DateTime.Now;
        if (now > certificate.NotAfter || now < certificate.NotBefore)
        {
            throw new ArgumentException($"{certPath} is valid only from {certificate.NotBefore:u} to {certificate.NotAfter:u}");
        }
        return new NbdTlsOptions { Mode = mode, Certificate = certificate, VerifyPeer = verifyPeer, TrustedCertificates = trusted };
    }

    /// <summary>
    /// Checks a psktool key file: it must exist and hold at least one <c>username:hexkey</c> line,
    /// and every line that is not blank must be one. GnuTLS only reads it at a handshake, where a bad
    /// file would refuse every client; checked here, it is refused at start. Throws
    /// <see cref="ArgumentException"/> naming the file and line.
    /// </summary>
    public static NbdTlsOptions LoadPsk(string file, NbdTlsMode mode)
    {
        string[] lines;
        try
        {
            lines = File.ReadAllLines(file);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new ArgumentException($"cannot read the PSK file {file}: {e.Message}", e);
        }
        var keys = 0;
        for (var i = 0; i < lines.Length; i++)
        {
            var line = lines[i];
            if (line.Trim().Length == 0)
            {
                continue;
            }
            var colon = line.IndexOf(':', StringComparison.Ordinal);
            var key = colon < 0 ? "" : line[(colon + 1)..];
            if (colon <= 0 || key.Length == 0 || key.Length % 2 != 0 || !key.All(char.IsAsciiHexDigit))
            {
                throw new ArgumentException($"{file} line {i + 1} is not 'username:hexkey' (make the file with psktool -u USER -p {file})");
            }
            keys++;
        }
        return keys == 0
            ? throw new ArgumentException($"{file} holds no key (make one with psktool -u USER -p {file})")
            : new NbdTlsOptions { Mode = mode, PskFile = file };
    }

    public void Validate()
    {
        if ((Certificate is null) == (PskFile is null))
        {
            throw new ArgumentException("TLS needs exactly one of a certificate (x509) and a PSK file", nameof(Certificate));
        }
        if (PskFile is not null)
        {
            if (VerifyPeer)
            {
                throw new ArgumentException("VerifyPeer is for x509 client certificates; with a PSK file every client proves it holds a key", nameof(VerifyPeer));
            }
            return;
        }
        if (!Certificate!.HasPrivateKey)
        {
            throw new ArgumentException("the TLS certificate has no private key", nameof(Certificate));
        }
        if (VerifyPeer && TrustedCertificates.Count == 0)
        {
            throw new ArgumentException("VerifyPeer needs at least one trusted CA certificate", nameof(TrustedCertificates));
        }
    }
}

/// <summary>
/// What a server's TLS handshakes share: the certificate context (x509, SslStream) or the PSK
/// credentials (GnuTLS), built once. Each x509 connection gets its own options, so a refused
/// client certificate can say why in the log.
/// </summary>
internal sealed class NbdTlsContext : IDisposable
{
    private readonly NbdTlsOptions _tls;
    private readonly SslStreamCertificateContext? _certificate;

    public NbdTlsContext(NbdTlsOptions tls)
    {
        _tls = tls;
        if (tls.PskFile is not null)
        {
            Psk = GnuTlsPskCredentials.FromFile(tls.PskFile);
            return;
        }
        SslCertificateTrust? trust = null;
        if (tls.VerifyPeer)
        {
            // Sent in the CertificateRequest: a client with several certificates picks the one this CA issued.
            trust = SslCertificateTrust.CreateForX509Collection(tls.TrustedCertificates, sendTrustInHandshake: true);
        }
        _certificate = SslStreamCertificateContext.Create(tls.Certificate!, null, offline: true, trust);
    }

    public NbdTlsMode Mode => _tls.Mode;

    /// <summary>The PSK credentials, when the server uses a PSK file rather than a certificate.</summary>
    public GnuTlsPskCredentials? Psk { get; }

    /// <summary>Frees the PSK credentials once the last session using them is gone.</summary>
    public void Dispose() => Psk?.Dispose();

    /// <summary>Options for one handshake; <paramref name="rejected"/> gets the reason if the client's certificate is refused.</summary>
    public SslServerAuthenticationOptions ForConnection(StrongBox<string?> rejected)
    {
        var options = new SslServerAuthenticationOptions
        {
            ServerCertificateContext = _certificate,
            ClientCertificateRequired = _tls.VerifyPeer,
            CertificateRevocationCheckMode = X509RevocationMode.NoCheck,
            EncryptionPolicy = EncryptionPolicy.RequireEncryption,
            AllowRenegotiation = false,
        };
        if (_tls.VerifyPeer)
        {
            var policy = new X509ChainPolicy
            {
                TrustMode = X509ChainTrustMode.CustomRootTrust,
                RevocationMode = X509RevocationMode.NoCheck,
            };
            policy.CustomTrustStore.AddRange(_tls.TrustedCertificates);
            options.CertificateChainPolicy = policy;
            // The chain is checked against our CA only: any error (no certificate, another CA,
            // expired) refuses the client.
            options.RemoteCertificateValidationCallback = (_, certificate, chain, errors) =>
            {
                if (certificate is null)
                {
                    rejected.Value = "the client sent no certificate (--tls-verify-peer)";
                    return false;
                }
                if (errors == SslPolicyErrors.None)
                {
                    return true;
                }
                var status = chain?.ChainStatus.Select(s => $"{s.Status} ({s.StatusInformation.Trim()})") ?? [];
                rejected.Value = $"client certificate '{certificate.Subject}' refused: {string.Join(", ", status.DefaultIfEmpty(errors.ToString()))}";
                return false;
            };
        }
        return options;
    }
}
