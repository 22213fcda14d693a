using System.Net.Sockets;
using System.Text;
using UblkSharp.Cli.Logging;

namespace UblkSharp.Cli;

/// <summary>
/// sd_notify(3) for `Type=notify` units: state lines ("READY=1", "STOPPING=1", "STATUS=...") sent
/// as one datagram to the unix socket systemd names in NOTIFY_SOCKET (a path, or "@name" for the
/// abstract namespace). The variable is taken out of the environment at start, as sd_notify's
/// unset_environment does, so the daemons this process starts (a supervisor's children, a detached
/// daemon) never speak for the service: only the process systemd started does.
/// </summary>
internal static class SystemdNotify
{
    public const string Variable = "NOTIFY_SOCKET";

    private static string? _socket;

    /// <summary>Reads NOTIFY_SOCKET and removes it from this process's environment. Call once, first.</summary>
    public static void TakeFromEnvironment()
    {
        _socket = Environment.GetEnvironmentVariable(Variable);
        Environment.SetEnvironmentVariable(Variable, null);
    }

    /// <summary>Whether a service manager listens (NOTIFY_SOCKET was set).</summary>
    public static bool Enabled => !string.IsNullOrEmpty(_socket);

    /// <summary>Sends <paramref name="state"/> (newline-separated assignments); false if there is no socket or the send failed.</summary>
    public static bool Send(string state)
    {
        if (_socket is not { Length: > 1 } socket || (socket[0] != '/' && socket[0] != '@'))
        {
            return false;
        }
        try
        {
            using var s = new Socket(AddressFamily.Unix, SocketType.Dgram, ProtocolType.Unspecified);
            // An abstract address is the name after a NUL byte.
            var address = socket[0] == '@' ? "\0" + socket[1..] : socket;
            s.SendTo(Encoding.UTF8.GetBytes(state), new UnixDomainSocketEndPoint(address));
            return true;
        }
        catch (SocketException e)
        {
            // A notification that cannot be sent must not take the device down; systemd's own timeout tells.
            CliLog.Warning($"sd_notify to {socket} failed: {e.Message}");
            return false;
        }
    }

    /// <summary>The device serves IO: READY=1, with its path as the status.</summary>
    public static void Ready(string path) => Send($"READY=1\nSTATUS=serving {path}\nMAINPID={Environment.ProcessId}");

    public static void Stopping() => Send("STOPPING=1");
}
