using System.Net.Security;
using System.Runtime.CompilerServices;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;

namespace UblkSharp.Nbd.Protocol;

/// <summary>
/// A client's x509 credentials for NBD over TLS (nbds:// URIs), in the layout qemu and libnbd use:
/// ca-cert.pem, whose CA the server's certificate must chain to, and optionally client-cert.pem
/// with client-key.pem for servers that verify their clients. There is no unauthenticated TLS: a
/// server is always checked against the CA, and against the URI's host name. Or TLS-PSK
/// (<see cref="LoadPsk"/>): a username and its key from a psktool file, which both sides hold.
/// </summary>
public sealed record NbdClientTlsOptions
{
    /// <summary>x509: the CA (or CAs) the server's certificate must chain to; the system's are not used. Null for PSK.</summary>
    public X509Certificate2Collection? TrustedCertificates { get; init; }

    /// <summary>TLS-PSK: the psktool key file (<c>username:hexkey</c> lines), by path; null for x509.</summary>
    public string? PskFile { get; init; }

    /// <summary>TLS-PSK: whose key in <see cref="PskFile"/> this client uses.</summary>
    public string? PskUsername { get; init; }

    /// <summary>The client's certificate, with its private key, for servers that ask for one.</summary>
    public X509Certificate2? Certificate { get; init; }

    /// <summary>The directory these came from (kept in a device's recipe), or null.</summary>
    public string? Directory { get; init; }

    /// <summary>
    /// Loads ca-cert.pem, and client-cert.pem with client-key.pem if there, from
    /// <paramref name="directory"/>. Throws <see cref="ArgumentException"/> naming the file that is
    /// missing or unusable.
    /// </summary>
    public static NbdClientTlsOptions Load(string directory)
    {
        ArgumentNullException.ThrowIfNull(directory);
        if (!System.IO.Directory.Exists(directory))
        {
            throw new ArgumentException($"TLS certificates directory {directory} does not exist");
        }
        var caPath = Path.Combine(directory, "ca-cert.pem");
        var certPath = Path.Combine(directory, "client-cert.pem");
        var keyPath = Path.Combine(directory, "client-key.pem");
        if (!File.Exists(caPath))
        {
            throw new ArgumentException($"{caPath} is missing: without the CA the server's certificate cannot be checked, and TLS that does not know whom it talks to is refused");
        }
        var trusted = new X509Certificate2Collection();
        try
        {
            trusted.ImportFromPemFile(caPath);
        }
        catch (CryptographicException e)
        {
            throw new ArgumentException($"cannot load {caPath}: {e.Message}", e);
        }
        if (trusted.Count == 0)
        {
            throw new ArgumentException($"{caPath} holds no certificate");
        }
        X509Certificate2? certificate = null;
        if (File.Exists(certPath) != File.Exists(keyPath))
        {
            throw new ArgumentException($"{(File.Exists(certPath) ? keyPath : certPath)} is missing (a client certificate needs both client-cert.pem and client-key.pem)");
        }
        if (File.Exists(certPath))
        {
            try
            {
                using var pem = X509Certificate2.CreateFromPemFile(certPath, keyPath);
                // As for the server's: an ephemeral key from PEM becomes an ordinary one through PKCS#12.
                certificate = X509CertificateLoader.LoadPkcs12(pem.Export(X509ContentType.Pkcs12), null);
            }
            catch (CryptographicException e)
            {
                throw new ArgumentException($"cannot load {certPath} with {keyPath}: {e.Message}", e);
            }
        }
        return new NbdClientTlsOptions { TrustedCertificates = trusted, Certificate = certificate, Directory = Path.GetFullPath(directory) };
    }

    /// <summary>
    /// TLS-PSK as <paramref name="username"/> with that user's key in the psktool file
    /// <paramref name="file"/> (read at each connect, never copied). Throws
    /// <see cref="ArgumentException"/> when the file cannot be read or holds no usable key for them.
    /// </summary>
    public static NbdClientTlsOptions LoadPsk(string file, string username)
    {
        ArgumentException.ThrowIfNullOrEmpty(file);
        ArgumentException.ThrowIfNullOrEmpty(username);
        _ = UblkSharp.Interop.GnuTls.GnuTlsPskClientCredentials.KeyOf(file, username);
        return new NbdClientTlsOptions { PskFile = Path.GetFullPath(file), PskUsername = username };
    }

    /// <summary>
    /// Options for one handshake with a server that must prove to be <paramref name="host"/> (null:
    /// a Unix socket with no name to check, so only the chain is). The reason a refused server
    /// certificate was refused goes to <paramref name="rejected"/>.
    /// </summary>
    internal SslClientAuthenticationOptions ForConnection(string? host, StrongBox<string?> rejected)
    {
        var policy = new X509ChainPolicy
        {
            TrustMode = X509ChainTrustMode.CustomRootTrust,
            RevocationMode = X509RevocationMode.NoCheck,
        };
        policy.CustomTrustStore.AddRange(TrustedCertificates ?? throw new InvalidOperationException("no CA for an x509 handshake"));
        return new SslClientAuthenticationOptions
        {
            TargetHost = host ?? "",
            CertificateChainPolicy = policy,
            CertificateRevocationCheckMode = X509RevocationMode.NoCheck,
            EncryptionPolicy = EncryptionPolicy.RequireEncryption,
            AllowRenegotiation = false,
            // Sent whatever CAs the server names (GnuTLS servers may name none).
            ClientCertificateContext = Certificate is null ? null : SslStreamCertificateContext.Create(Certificate, null, offline: true),
            RemoteCertificateValidationCallback = (_, certificate, chain, errors) =>
            {
                if (certificate is null)
                {
                    rejected.Value = "the server sent no certificate";
                    return false;
                }
                if (host is null)
                {
                    errors &= ~SslPolicyErrors.RemoteCertificateNameMismatch;
                }
                if (errors == SslPolicyErrors.None)
                {
                    return true;
                }
                var why = new List<string>();
                if ((errors & SslPolicyErrors.RemoteCertificateNameMismatch) != 0)
                {
                    why.Add($"it is not for '{host}'");
                }
                if ((errors & SslPolicyErrors.RemoteCertificateChainErrors) != 0)
                {
                    var status = chain?.ChainStatus.Select(s => $"{s.Status} ({s.StatusInformation.Trim()})") ?? [];
                    why.Add($"it is not vouched for by the CA in ca-cert.pem ({string.Join(", ", status.DefaultIfEmpty("chain errors"))})");
                }
                rejected.Value = $"the server's certificate '{certificate.Subject}' is refused: {string.Join(", ", why.DefaultIfEmpty(errors.ToString()))}";
                return false;
            },
        };
    }
}
