using System.Net;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;

namespace UblkSharp.Tests.Nbd;

/// <summary>
/// Certificates for the TLS tests, made with .NET's CertificateRequest (no certtool needed) and
/// written as PEM in the layout qemu, nbdkit and libnbd read: a directory per role with
/// ca-cert.pem and the role's cert and key. Made once per test class.
/// </summary>
public sealed class TlsCertificates : IDisposable
{
    public TlsCertificates()
    {
        Root = Directory.CreateTempSubdirectory("ublksharp-tls-").FullName;
        var now = DateTimeOffset.UtcNow;
        using var ca = MakeCa("UblkSharp test CA", now);
        using var otherCa = MakeCa("Another CA", now);
        Server = Write("server", ca, "server", Leaf(ca, "localhost", server: true, now.AddDays(-1), now.AddDays(30)));
        Client = Write("client", ca, "client", Leaf(ca, "client", server: false, now.AddDays(-1), now.AddDays(30)));
        ExpiredServer = Write("expired-server", ca, "server", Leaf(ca, "localhost", server: true, now.AddDays(-20), now.AddDays(-10)));
        ExpiredClient = Write("expired-client", ca, "client", Leaf(ca, "client", server: false, now.AddDays(-20), now.AddDays(-10)));
        // A client that trusts another CA (so not our server), with a certificate that CA issued.
        OtherCaClient = Write("other-ca-client", otherCa, "client", Leaf(otherCa, "client", server: false, now.AddDays(-1), now.AddDays(30)));
        // A client that trusts our server but holds a certificate from another CA.
        ForeignClient = Write("foreign-client", ca, "client", Leaf(otherCa, "client", server: false, now.AddDays(-1), now.AddDays(30)));
    }

    public string Root { get; }

    /// <summary>ca-cert.pem, server-cert.pem, server-key.pem (SAN localhost and 127.0.0.1).</summary>
    public string Server { get; }

    /// <summary>ca-cert.pem, client-cert.pem, client-key.pem: a client our CA vouches for.</summary>
    public string Client { get; }

    public string ExpiredServer { get; }

    public string ExpiredClient { get; }

    public string OtherCaClient { get; }

    public string ForeignClient { get; }

    private static X509Certificate2 MakeCa(string name, DateTimeOffset now)
    {
        using var key = RSA.Create(2048);
        var request = new CertificateRequest($"CN={name}", key, HashAlgorithmName.SHA256, RSASignaturePadding.Pkcs1);
        request.CertificateExtensions.Add(new X509BasicConstraintsExtension(true, false, 0, true));
        request.CertificateExtensions.Add(new X509KeyUsageExtension(X509KeyUsageFlags.KeyCertSign | X509KeyUsageFlags.CrlSign, true));
        request.CertificateExtensions.Add(new X509SubjectKeyIdentifierExtension(request.PublicKey, false));
        return request.CreateSelfSigned(now.AddDays(-60), now.AddYears(1));
    }

    private static (X509Certificate2 Certificate, RSA Key) Leaf(X509Certificate2 ca, string name, bool server, DateTimeOffset from, DateTimeOffset to)
    {
        var key = RSA.Create(2048);
        var request = new CertificateRequest($"CN={name}", key, HashAlgorithmName.SHA256, RSASignaturePadding.Pkcs1);
        request.CertificateExtensions.Add(new X509BasicConstraintsExtension(false, false, 0, true));
        request.CertificateExtensions.Add(new X509KeyUsageExtension(X509KeyUsageFlags.DigitalSignature | X509KeyUsageFlags.KeyEncipherment, true));
        request.CertificateExtensions.Add(new X509EnhancedKeyUsageExtension([new Oid(server ? "1.3.6.1.5.5.7.3.1" : "1.3.6.1.5.5.7.3.2")], false));
        request.CertificateExtensions.Add(new X509SubjectKeyIdentifierExtension(request.PublicKey, false));
        request.CertificateExtensions.Add(X509AuthorityKeyIdentifierExtension.CreateFromCertificate(ca, true, false));
        var san = new SubjectAlternativeNameBuilder();
        san.AddDnsName(name);
        if (server)
        {
            san.AddIpAddress(IPAddress.Loopback);
        }
        request.CertificateExtensions.Add(san.Build());
        var serial = RandomNumberGenerator.GetBytes(16);
        serial[0] &= 0x7f;
        return (request.Create(ca, from, to, serial), key);
    }

    private string Write(string directory, X509Certificate2 ca, string role, (X509Certificate2 Certificate, RSA Key) leaf)
    {
        var path = Path.Combine(Root, directory);
        Directory.CreateDirectory(path);
        File.WriteAllText(Path.Combine(path, "ca-cert.pem"), ca.ExportCertificatePem());
        File.WriteAllText(Path.Combine(path, $"{role}-cert.pem"), leaf.Certificate.ExportCertificatePem());
        var key = Path.Combine(path, $"{role}-key.pem");
        File.WriteAllText(key, leaf.Key.ExportPkcs8PrivateKeyPem());
        if (!OperatingSystem.IsWindows())
        {
            File.SetUnixFileMode(key, UnixFileMode.UserRead | UnixFileMode.UserWrite);
        }
        leaf.Certificate.Dispose();
        leaf.Key.Dispose();
        return path;
    }

    public void Dispose()
    {
        try
        {
            Directory.Delete(Root, recursive: true);
        }
        catch (IOException)
        {
        }
    }
}
