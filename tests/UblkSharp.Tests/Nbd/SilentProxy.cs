using System.Net;
using System.Net.Sockets;

namespace UblkSharp.Tests.Nbd;

/// <summary>
/// A TCP proxy on loopback in front of an NBD server that can be told to stop forwarding without
/// closing anything: bytes are read and dropped both ways, so the client sees a peer that accepted
/// and then went silent (a half-open upstream), with no RST and no FIN. It listens on TCP loopback,
/// or on a unix socket (in the VM, which has no network). Shared with the VM tests.
/// </summary>
internal sealed class SilentProxy : IDisposable
{
    private readonly Socket _listener;
    private readonly Func<Socket> _connectUpstream;
    private readonly List<Socket> _sockets = [];
    private volatile bool _forwarding = true;
    private volatile bool _disposed;

    public SilentProxy(Func<Socket> connectUpstream, string? listenPath = null)
    {
        _connectUpstream = connectUpstream;
        if (listenPath is null)
        {
            _listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
            _listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
            Port = ((IPEndPoint)_listener.LocalEndPoint!).Port;
        }
        else
        {
            _listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            _listener.Bind(new UnixDomainSocketEndPoint(listenPath));
            SocketPath = listenPath;
        }
        _listener.Listen(16);
        new Thread(Accept) { IsBackground = true, Name = "silent-proxy" }.Start();
    }

    /// <summary>A proxy to a server listening on a unix socket; itself on TCP loopback, or on <paramref name="listenPath"/>.</summary>
    public static SilentProxy ToUnix(string path, string? listenPath = null) => new(() =>
    {
        var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        s.Connect(new UnixDomainSocketEndPoint(path));
        return s;
    }, listenPath);

    /// <summary>The TCP port (0 on a unix socket).</summary>
    public int Port { get; }

    /// <summary>The unix socket listened on, if any.</summary>
    public string? SocketPath { get; }

    public string Uri(string export = "") => SocketPath is null ? $"nbd://127.0.0.1:{Port}/{export}" : $"nbd+unix:///{export}?socket={SocketPath}";

    /// <summary>Connections accepted so far.</summary>
    public int Accepted { get; private set; }

    public bool Forwarding
    {
        get => _forwarding;
        set => _forwarding = value;
    }

    private void Accept()
    {
        while (!_disposed)
        {
            Socket client;
            Socket upstream;
            try
            {
                client = _listener.Accept();
                upstream = _connectUpstream();
            }
            catch (Exception e) when (e is SocketException or ObjectDisposedException)
            {
                continue;
            }
            lock (_sockets)
            {
                Accepted++;
                _sockets.Add(client);
                _sockets.Add(upstream);
            }
            new Thread(() => Pump(client, upstream)) { IsBackground = true }.Start();
            new Thread(() => Pump(upstream, client)) { IsBackground = true }.Start();
        }
    }

    private void Pump(Socket from, Socket to)
    {
        var buffer = new byte[64 * 1024];
        try
        {
            while (true)
            {
                var n = from.Receive(buffer);
                if (n == 0)
                {
                    break;
                }
                if (_forwarding)
                {
                    to.Send(buffer, 0, n, SocketFlags.None);
                }
            }
            to.Shutdown(SocketShutdown.Send);
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException)
        {
        }
    }

    /// <summary>Closes every connection made so far, both ways (as a server that restarts).</summary>
    public void CloseAll()
    {
        lock (_sockets)
        {
            foreach (var s in _sockets)
            {
                s.Dispose();
            }
            _sockets.Clear();
        }
    }

    public void Dispose()
    {
        _disposed = true;
        _listener.Dispose();
        if (SocketPath is not null)
        {
            File.Delete(SocketPath);
        }
        lock (_sockets)
        {
            foreach (var s in _sockets)
            {
                s.Dispose();
            }
        }
    }
}
