package main

// Test-controlled faults of the PropertyCollector, for answers vCenter gives and the
// simulator never does.
//
// While the file given with -faults-file exists, each of its lines turns one fault on
// (the file is read at every call, so a test changes the faults of a running
// simulator, and removing the file turns them all off):
//
//   not-authenticated         every RetrievePropertiesEx ends the caller's session and
//                             answers NotAuthenticated (a vCenter that drops each
//                             session right after its login)
//   vm-without-config MOID    the VM MOID is answered without its config.* properties
//                             (an inaccessible or orphaned VM)
//   task-vanishes             a Task is answered as no object (a task vCenter forgot)
//   task-without-result       a Task is answered without info.result
//   snapshot-without-devices  a VirtualMachineSnapshot is answered without
//                             config.hardware.device
//
// The faults apply to the answers of fetchFixPC (fetch.go), so -stock-fetch turns
// them off as well.

import (
	"bufio"
	"os"
	"strings"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// faultsFile is package-wide: the simulator makes each session's collector as a
// zero value of the registered type, so a field would be lost.
var faultsFile string

// activeFaults returns mode -> argument ("" when none) of the faults turned on.
func activeFaults() map[string]string {
	if faultsFile == "" {
		return nil
	}
	f, err := os.Open(faultsFile)
	if err != nil {
		return nil
	}
	defer f.Close()
	set := map[string]string{}
	scanner := bufio.NewScanner(f)
	for scanner.Scan() {
		fields := strings.Fields(scanner.Text())
		if len(fields) == 0 {
			continue
		}
		set[fields[0]] = strings.Join(fields[1:], " ")
	}
	return set
}

func (pc *fetchFixPC) RetrievePropertiesEx(ctx *simulator.Context, r *types.RetrievePropertiesEx) soap.HasFault {
	res := pc.PropertyCollector.RetrievePropertiesEx(ctx, r)
	faults := activeFaults()
	if len(faults) == 0 {
		return res
	}
	if _, ok := faults["not-authenticated"]; ok {
		if ctx.Session != nil { // the session ends, as vCenter's does: a new login works
			ctx.Map.SessionManager().Logout(ctx, &types.Logout{})
		}
		return &methods.RetrievePropertiesExBody{
			Fault_: simulator.Fault("", &types.NotAuthenticated{
				NoPermission: types.NoPermission{Object: r.This, PrivilegeId: "System.View"},
			}),
		}
	}
	body, ok := res.(*methods.RetrievePropertiesExBody)
	if !ok || body.Res == nil || body.Res.Returnval == nil {
		return res
	}
	var objects []types.ObjectContent
	for _, o := range body.Res.Returnval.Objects {
		drop := func(string) bool { return false }
		switch o.Obj.Type {
		case "Task":
			if _, ok := faults["task-vanishes"]; ok {
				continue
			}
			if _, ok := faults["task-without-result"]; ok {
				drop = func(name string) bool { return name == "info.result" || name == "info" }
			}
		case "VirtualMachine":
			if moid, ok := faults["vm-without-config"]; ok && moid == o.Obj.Value {
				drop = func(name string) bool { return name == "config" || strings.HasPrefix(name, "config.") }
			}
		case "VirtualMachineSnapshot":
			if _, ok := faults["snapshot-without-devices"]; ok {
				drop = func(name string) bool { return name == "config" || strings.HasPrefix(name, "config.") }
			}
		}
		props := o.PropSet[:0]
		for _, p := range o.PropSet {
			if !drop(p.Name) {
				props = append(props, p)
			}
		}
		o.PropSet = props
		objects = append(objects, o)
	}
	body.Res.Returnval.Objects = objects
	if len(objects) == 0 {
		body.Res.Returnval = nil // as the simulator answers a retrieval that found nothing
	}
	return body
}
